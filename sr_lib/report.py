"""sr_eval.py --report DIR: a self-contained HTML report of an evaluation.

DIR/index.html (inline CSS, no script, no network) shows the results table, the NTIRE 2021
trade-off plots (diversity score vs LPIPS and LR-PSNR vs LPIPS, one labelled point per method and
temperature; the temperatures of one sweep joined by a line, as in the challenge report) and per
image a contact sheet: LR, GT, then per method its samples and their per-pixel standard deviation
across samples (white: its 99.5th percentile). Every thumbnail links to a full-size image in DIR:

  plots/*.png                     the plots (matplotlib, Agg, drawn off-screen)
  images/{k:06d}/gt.png, lr.png   the GT (hard link or copy of the file; written as PNG when it
                                  is not one a browser shows) and the LR (the --lr file, else the
                                  bicubic downscale of the GT's official crop)
  images/{k:06d}/m{j:02d}/        method j: its sample files (hard links or copies) and std.png
  */thumb_*.png                   thumbnails, at most THUMB px on a side
Nothing refers to a file outside DIR, so the folder can be copied or archived as it is. An
earlier report there (these three names) is moved into DIR/old while a rerun works (sr_eval.py);
an index.html is taken for one only by the mark in its head, GENERATOR (or the fixed start of
the pages written before it), and otherwise refused as the user's own.
"""

import errno
import fcntl
import html
import math
import os
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

import numpy as np
from PIL import Image

from sr_lib.data import write_png, write_text
from sr_lib.errors import OutputError, UsageError, printable
from sr_lib.metrics import downscale, official_mod

THUMB = 160  # thumbnail: longest side in px
PARTS = ("index.html", "plots", "images")  # what a report writes in its folder
# written before a report's first file and deleted after its page (`started`): a run killed in
# between (SIGKILL, the out-of-memory killer: no code of its runs) leaves it beside its half report
UNFINISHED = ".sr_eval_unfinished"
BROWSER_FORMATS = (".png", ".jpg", ".jpeg", ".webp")
# The mark of a page of sr_eval.py in its <head>: an index.html without it is not a report's
# (`is_report_page`), and sr_eval.py refuses to move it aside and delete it.
GENERATOR = '<meta name="generator" content="srspace sr_eval.py">'
# The pages written before the mark (2026-12-04 on) begin so and hold this table head, in every
# version of write_report: taken for reports too, so a rerun replaces them as before.
EARLIER_START = '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n<title>'
EARLIER_TABLE = '<table class="results"><thead><tr><th>method</th><th>T</th><th>N</th>'
PAGE_READ = 1 << 16  # bytes of an index.html read to tell (the table head is within ~2 kB)
# (y column, x column, title, file): the NTIRE 2021 report's two trade-offs, then what can be
# plotted without LPIPS (--no-lpips).
PLOTS = (
    ("score", "LPIPS_mean", "Diversity score vs LPIPS", "score_vs_lpips.png"),
    ("LRPSNR_mean", "LPIPS_mean", "LR-PSNR vs LPIPS", "lrpsnr_vs_lpips.png"),
)
FALLBACK_PLOT = ("LRPSNR_mean", "PSNR_mean", "LR-PSNR vs PSNR", "lrpsnr_vs_psnr.png")
AXIS = {
    "score": "diversity score, % (higher: more diverse)",
    "LPIPS_mean": "LPIPS (lower: closer to the GT)",
    "LRPSNR_mean": "LR-PSNR, dB (higher: more consistent with the LR)",
    "PSNR_mean": "PSNR, dB",
}


def check_matplotlib() -> None:
    """matplotlib draws the plots and std maps of a report only: sr_eval.py without --report runs
    without it, and with --report a missing one is a line before any work, not a traceback."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError(
            "--report needs the matplotlib package (its plots): pip install matplotlib, or leave "
            "--report out"
        ) from None


def fmt(v: float | None, col: str) -> str:
    """A table cell: 4 decimals for LPIPS and SSIM, 2 for dB and scores, '-' when missing."""
    if v is None or math.isnan(v):
        return "-"
    return f"{v:.4f}" if col.startswith(("LPIPS", "SSIM")) else f"{v:.2f}"


def place(src: Path, dst: Path) -> None:
    """dst becomes a hard link to src (no extra space), or a copy across file systems."""
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.unlink(missing_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)
    except OSError as e:
        raise OutputError(f"{dst}: cannot write ({e.strerror or e}); check --report") from None


def full_and_thumb(folder: Path, name: str, img: np.ndarray, src: Path | None) -> tuple[str, str]:
    """Write folder/name.png (or link src there) and its thumbnail; their paths in the report."""
    if src is not None and src.suffix.lower() in BROWSER_FORMATS:
        full = folder / f"{name}{src.suffix.lower()}"
        place(src, full)
    else:
        full = folder / f"{name}.png"
        write_png(full, img)
    factor = max(1, math.ceil(max(img.shape[:2]) / THUMB))
    thumb = folder / f"thumb_{name}.png"
    write_png(thumb, np.asarray(Image.fromarray(img).reduce(factor)))
    return full.as_posix(), thumb.as_posix()


def std_map(samples: list[np.ndarray]) -> tuple[np.ndarray, float]:
    """Per-pixel standard deviation across samples (mean over RGB, 0..255 scale) as a magma
    heat map whose white is its 99.5th percentile (a few outliers do not darken the rest), and
    that value."""
    from matplotlib import colormaps  # (here: matplotlib is needed by --report only)

    h = min(s.shape[0] for s in samples)
    w = min(s.shape[1] for s in samples)
    total = np.zeros((h, w, 3), np.float64)
    squares = np.zeros((h, w, 3), np.float64)
    for s in samples:  # running sums: no (N, H, W, 3) float stack in memory
        x = s[:h, :w].astype(np.float64)
        total += x
        squares += x * x
    mean = total / len(samples)
    std = np.sqrt(np.clip(squares / len(samples) - mean * mean, 0, None)).mean(axis=2)
    top = float(np.percentile(std, 99.5)) or float(std.max())
    heat = colormaps["magma"](np.clip(std / top, 0, 1) if top > 0 else std)[..., :3]
    return np.round(heat * 255).astype(np.uint8), top


@contextmanager
def locked(folder: Path):
    """The report folder locked while this run writes its report there: a second sr_eval.py
    writing into it at once would mix its panels with this one's and replace its page, and a
    stop of either would delete the other's images/. A flock on the folder itself: no file is
    left, and the kernel drops it when the process ends, however it ends (kill -9 too). (sr_eval
    forks no process that would share it.) A file system without locks: one warning."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):  # held by another
                busy = (f"--report {folder}: another sr_eval.py writes its report there; wait "
                        "for it to end or give another --report")  # fmt: skip
                raise UsageError(busy) from None
            warnings.warn(f"--report {folder}: cannot lock the folder ({e.strerror or e}); a "
                          "second run writing its report there would not be noticed",
                          stacklevel=3)  # fmt: skip
        yield
    finally:
        os.close(fd)


def is_report_page(path: Path) -> bool:
    """Whether the file `path` is a page that sr_eval.py wrote: the GENERATOR mark in its head,
    or the start and the table head of the pages before the mark. False for anything else (the
    user's own page, a folder, a file that cannot be read)."""
    try:
        with open(path, "rb") as f:
            text = f.read(PAGE_READ).decode("utf-8", "replace")
    except OSError:
        return False
    if GENERATOR in text.split("</head>", 1)[0]:
        return True
    return text.startswith(EARLIER_START) and EARLIER_TABLE in text


def half_report(folder: Path) -> bool:
    """Whether `folder` holds a half report that a killed run left: its UNFINISHED mark and no
    index.html (its images/ and plots/, if any, are that run's, not the user's)."""
    return (folder / UNFINISHED).exists() and not (folder / "index.html").exists()


def started(folder: Path) -> None:
    """Before the report's first file: a killed run's half report (`half_report`) deleted, and
    the UNFINISHED mark written, which `write_report` deletes after the page."""
    if half_report(folder):
        remove_half(folder)
    write_text(folder / UNFINISHED, "sr_eval.py is writing its report here\n")


def remove_half(folder: Path) -> None:
    """A half report's files (no page shows them) and its UNFINISHED mark, deleted."""
    for part in ("images", "plots"):
        shutil.rmtree(folder / part, ignore_errors=True)
    (folder / UNFINISHED).unlink(missing_ok=True)


@contextmanager
def removed_if_unfinished(folder: Path | None):
    """The report's files removed where the run stops inside (a full disk, Ctrl-C, a bad image)
    after its first file: its images/ and plots/, half of them written, would be shown by no page
    (index.html is written last; an earlier report's was moved to DIR/old before the first file,
    sr_eval.set_aside) and taken for a whole report. Where index.html is still there (a stop
    before the earlier report was moved, or after the page), nothing is removed."""
    try:
        yield
    except BaseException:
        if folder is not None and not (Path(folder) / "index.html").exists():
            remove_half(Path(folder))
        raise


def contact_sheet(folder, k, stem, gt_file, gt, lr_file, lr, methods, scale) -> dict:
    """Write image k's panels under folder/images/{k:06d}/ and return what the page shows:
    {"stem", "panels": [(label, full, thumb)], "methods": [(name, panels, note)]}; `methods`
    is [(name, sample files, decoded samples)]. Paths are relative to folder."""
    here = Path(folder) / "images" / f"{k:06d}"
    rel = lambda p: Path(p).relative_to(folder).as_posix()  # noqa: E731
    if lr is None:  # the LR the official columns compare against
        mod = official_mod(scale)
        lr = downscale(gt[: gt.shape[0] // mod * mod, : gt.shape[1] // mod * mod], scale)
    panels = []
    for label, name, img, src in (("LR", "lr", lr, lr_file), ("GT", "gt", gt, gt_file)):
        full, thumb = full_and_thumb(here, name, img, src)
        size = f"{img.shape[1]}x{img.shape[0]}"
        panels.append((f"{label} {size}", rel(full), rel(thumb)))
    rows = []
    for j, (name, files, samples) in enumerate(methods):
        sub = here / f"m{j:02d}"
        row = []
        for i, (f, img) in enumerate(zip(files, samples)):
            full, thumb = full_and_thumb(sub, f"sample{i:05d}", img, Path(f))
            row.append((f"sample {i}", rel(full), rel(thumb)))
        note = "one sample: no std across samples"
        if len(samples) > 1:
            heat, top = std_map(samples)
            full, thumb = full_and_thumb(sub, "std", heat, None)
            row.append((f"std (white: {top:.1f}/255)", rel(full), rel(thumb)))
            note = ""
        rows.append((name, row, note))
    return {"stem": stem, "panels": panels, "methods": rows}


def trade_off_plot(table, ycol: str, xcol: str, title: str, path: Path):
    """One labelled point per row of `table` [(name, temperature, n, means)] with finite
    values (the temperatures of one sweep joined in order); (points, rows left out)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    points, left_out = [], []
    for name, t, _, means in table:
        x, y = means.get(xcol), means.get(ycol)
        if x is None or y is None or not (math.isfinite(x) and math.isfinite(y)):
            left_out.append(f"{name} ({xcol} {fmt(x, xcol)}, {ycol} {fmt(y, ycol)})")
        else:
            points.append((name, t, x, y))
    if not points:
        return points, left_out
    fig = Figure(figsize=(6.4, 4.8), dpi=100)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    sweeps: dict[str, list] = {}
    for name, t, x, y in points:
        if t is not None and "@T" in name:
            sweeps.setdefault(name.rsplit("@T", 1)[0], []).append((t, x, y))
    for line in sweeps.values():
        if len(line) > 1:
            line.sort()
            ax.plot([p[1] for p in line], [p[2] for p in line], color="0.75", zorder=1)
    ax.scatter([p[2] for p in points], [p[3] for p in points], zorder=2)
    ax.margins(0.2)  # room for the labels of the outermost points
    ax.autoscale_view()
    # Labels of points that (nearly) coincide on the canvas are stacked, not drawn over each other.
    placed: list[tuple[float, float]] = []
    for name, _, x, y in points:
        px, py = ax.transData.transform((x, y))
        k = sum(abs(px - qx) < 60 and abs(py - qy) < 10 for qx, qy in placed)
        placed.append((px, py))
        label = printable(name)  # a folder name that is not UTF-8: escapes, as on stdout
        ax.annotate(label, (x, y), xytext=(4, 4 + 10 * k), textcoords="offset points", fontsize=8)
    ax.set_xlabel(AXIS.get(xcol, xcol))
    ax.set_ylabel(AXIS.get(ycol, ycol))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    canvas.draw()
    write_png(path, np.ascontiguousarray(np.asarray(canvas.buffer_rgba())[..., :3]))
    return [(name, x, y) for name, _, x, y in points], left_out


CSS = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table.results { border-collapse: collapse; margin-bottom: 1em; }
table.results th, table.results td { border: 1px solid #bbb; padding: 0.2em 0.6em; }
table.results td.num { text-align: right; font-variant-numeric: tabular-nums; }
.plots img { max-width: 48%; margin-right: 1%; border: 1px solid #ddd; }
.note { color: #a33; }
.sheet { margin: 1em 0 2em; border-top: 1px solid #ccc; }
.row { display: flex; flex-wrap: wrap; align-items: flex-end; gap: 6px; margin: 4px 0; }
.row .label { width: 12em; font-weight: bold; word-break: break-all; }
figure { margin: 0; text-align: center; font-size: 0.75em; }
figure img { display: block; border: 1px solid #ddd; image-rendering: pixelated; }
"""


def link(full: str, thumb: str, caption: str) -> str:
    cap = html.escape(caption)
    return (
        f'<figure><a href="{quote(full)}"><img src="{quote(thumb)}" alt="{cap}"></a>'
        f"<figcaption>{cap}</figcaption></figure>"
    )


def write_report(folder, title: str, columns, table, sheets, no_lpips: str = "") -> Path:
    """Write folder/index.html (after its plots); `table`: [(name, temperature, n, means)],
    `sheets`: contact_sheet's results; `no_lpips`: why LPIPS is missing, said on the page (the
    LPIPS plots are then replaced by LR-PSNR vs PSNR where that was computed)."""
    folder = Path(folder)
    notes = [no_lpips] if no_lpips else []
    specs = list(PLOTS) if not no_lpips else []
    if no_lpips:
        specs += [FALLBACK_PLOT] if FALLBACK_PLOT[1] in columns else []
        names = " or ".join(p[2] for p in PLOTS)
        notes.append(f"no plot of {names}: LPIPS_mean and score were not computed")
    plots = []
    for ycol, xcol, name, file in specs:
        points, left_out = trade_off_plot(table, ycol, xcol, name, folder / "plots" / file)
        if points:
            plots.append(f"plots/{file}")
        if left_out:
            notes.append(f"{name}: not plotted (not finite): {'; '.join(left_out)}")
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["method", "T", "N", *columns])
    body = []
    for name, t, n, means in table:
        cells = [html.escape(name), "" if t is None else f"{t:g}", str(n)]
        cells += [fmt(means.get(c), c) for c in columns]
        tds = "".join(f'<td class="{"num" if j else ""}">{c}</td>' for j, c in enumerate(cells))
        body.append(f"<tr>{tds}</tr>")
    parts = [
        "<!DOCTYPE html>",
        f'<html lang="en"><head><meta charset="utf-8">{GENERATOR}',
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<table class="results"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody>'
        "</table>",
        *[f'<p class="note">{html.escape(n)}</p>' for n in notes],
        '<div class="plots">',
        *[f'<a href="{quote(p)}"><img src="{quote(p)}" alt="{html.escape(p)}"></a>' for p in plots],
        "</div>",
    ]
    for sheet in sheets:
        parts.append(f'<div class="sheet"><h2>{html.escape(sheet["stem"])}</h2>')
        inputs = "".join(link(full, thumb, label) for label, full, thumb in sheet["panels"])
        parts.append(f'<div class="row"><span class="label">input</span>{inputs}</div>')
        for name, panels, note in sheet["methods"]:
            shown = "".join(link(full, thumb, label) for label, full, thumb in panels)
            extra = f'<span class="note">{html.escape(note)}</span>' if note else ""
            parts.append(
                f'<div class="row"><span class="label">{html.escape(name)}</span>{shown}{extra}'
                "</div>"
            )
        parts.append("</div>")
    parts.append("</body></html>")
    index = folder / "index.html"
    write_text(index, "\n".join(parts) + "\n")
    (folder / UNFINISHED).unlink(missing_ok=True)  # (a kill before it: the page is whole)
    return index
