"""sr_eval.py on temperature sweeps, per-folder N and names, the table at 80 and 160 columns,
the --report HTML and the progress display."""

import csv
import io
import json
import os
import pty
import resource
import shutil
import signal
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import test_eval_cli
import test_sample_cluster
from matplotlib.axes import Axes
from rich.console import Console

import sr_eval
import sr_lib.report
import sr_sample
from sr_lib.data import link_to_nothing
from sr_lib.resize import imresize

REPO = Path(__file__).resolve().parents[1]
STEMS = ("0801", "0802")
TEMPS = (0.0, 0.5, 1.0)
flow_ckpt = test_sample_cluster.flow_ckpt  # the fixture: a tiny x4 SRFlow checkpoint
lpips_file = test_eval_cli.lpips_file  # the fixture: a random-weight LPIPS state_dict
make_hr = test_eval_cli.make_hr


def sweep_world(root: Path, n=3):
    """hr/, a sweep folder sweep/T0, T0.5, T1 (as sr_sample.py writes it: manifest.json, the
    stem layout, an lr/ folder beside) whose noise grows with T, and bicubic/ (N = 1)."""
    hr_dir, sweep, bic = root / "hr", root / "sweep", root / "bicubic"
    for d in (hr_dir, sweep / "lr", bic):
        d.mkdir(parents=True)
    for k, stem in enumerate(STEMS):
        hr = make_hr(48, 64, seed=k)
        iio.imwrite(hr_dir / f"{stem}.png", hr)
        up = imresize(imresize(hr, 1 / 4), 4)
        iio.imwrite(sweep / "lr" / f"{stem}.png", imresize(hr, 1 / 4))
        iio.imwrite(bic / f"{stem}.png", up)
        for t in TEMPS:
            folder = sweep / f"T{t:g}"
            folder.mkdir(exist_ok=True)
            (folder / "manifest.json").write_text(json.dumps({"temperature": t, "n": n}))
            for i in range(n):
                noise = np.random.default_rng(100 * k + i).normal(0, 1 + 12 * t, hr.shape)
                sr = np.clip(np.round(up + noise), 0, 255).astype(np.uint8)
                iio.imwrite(folder / f"{stem}_sample{i:05d}.png", sr)
    return hr_dir, sweep, bic


class Refs(HTMLParser):
    """Every href/src of a page, and whether it parsed."""

    def __init__(self):
        super().__init__()
        self.refs, self.tags = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.refs += [v for k, v in attrs if k in ("href", "src")]


def page_refs(index: Path) -> list[str]:
    parser = Refs()
    parser.feed(index.read_text())
    parser.close()
    assert {"html", "table", "img", "a"} <= set(parser.tags)
    return parser.refs


@pytest.fixture
def plotted(monkeypatch):
    """The points and labels each trade-off plot really draws (Axes.scatter / annotate)."""
    calls = []
    scatter, annotate = Axes.scatter, Axes.annotate

    def spy_scatter(ax, x, y, *a, **k):
        calls.append({"ax": ax, "points": list(zip(x, y)), "labels": []})
        return scatter(ax, x, y, *a, **k)

    def spy_annotate(ax, text, xy, *a, **k):
        next(c for c in calls if c["ax"] is ax)["labels"].append((text, *xy))
        return annotate(ax, text, xy, *a, **k)

    monkeypatch.setattr(Axes, "scatter", spy_scatter)
    monkeypatch.setattr(Axes, "annotate", spy_annotate)
    return calls


def test_sweep_rows_names_n_and_report(tmp_path, capsys, lpips_file, plotted):
    hr_dir, sweep, bic = sweep_world(tmp_path)
    out, rows_csv, rep = tmp_path / "r.json", tmp_path / "r.csv", tmp_path / "report"
    code = sr_eval.main([str(a) for a in (
        "--hr", hr_dir, "--sr", f"flow={sweep}", f"bicubic={bic}:1", "--scale", 4, "--n", 3,
        "--lpips-weights", lpips_file, "--device", "cpu", "--out", out, "--csv", rows_csv,
        "--report", rep, "--lr", sweep / "lr",
    )])  # fmt: skip
    assert code == 0
    names = ["flow@T0", "flow@T0.5", "flow@T1", "bicubic"]
    res = json.loads(out.read_text())["methods"]
    assert list(res) == names
    assert [res[m]["temperature"] for m in names] == [0.0, 0.5, 1.0, None]
    assert [res[m]["n"] for m in names] == [3, 3, 3, 1]
    assert res["flow@T0.5"]["sr_dir"] == str(sweep / "T0.5")
    scores = [res[m]["mean"]["score"] for m in names]
    assert scores[0] < scores[1] < scores[2] and scores[3] == 0  # diversity grows with T
    lines = list(csv.DictReader(rows_csv.read_text().splitlines()))
    assert [(r["method"], r["temperature"], r["n"]) for r in lines[::2]] == [
        ("flow@T0", "0", "3"), ("flow@T0.5", "0.5", "3"), ("flow@T1", "1", "3"),
        ("bicubic", "", "1"),
    ]  # fmt: skip
    shown = capsys.readouterr().out
    assert all(m in shown for m in names) and "N per method" in shown

    # the report: parses, every file it names exists inside it, one point per row per plot
    index = rep / "index.html"
    refs = page_refs(index)
    assert refs and all(not r.startswith(("/", "http", "file:", "..")) for r in refs)
    files = {(rep / r).resolve() for r in refs}
    assert all(f.is_file() and rep.resolve() in f.parents for f in files)
    assert len([r for r in refs if r.startswith("plots/")]) == 4  # 2 plots, img + link each
    assert len(plotted) == 2
    for call in plotted:
        assert len(call["points"]) == len(names)
        assert sorted(t for t, *_ in call["labels"]) == sorted(names)
        assert [tuple(p) for p in call["points"]] == [tuple(xy) for _, *xy in call["labels"]]
    by_label = {t: xy for t, *xy in plotted[0]["labels"]}
    for m in names:
        assert by_label[m] == pytest.approx([res[m]["mean"]["LPIPS_mean"], res[m]["mean"]["score"]])
    # contact sheets: LR, GT, each method's samples (+ std for N > 1) for each image
    text = index.read_text()
    for k, stem in enumerate(STEMS):
        assert f"<h2>{stem}</h2>" in text
        here = rep / "images" / f"{k:06d}"
        assert (here / "lr.png").is_file() and (here / "gt.png").is_file()
        for j in range(3):
            assert len(list((here / f"m{j:02d}").glob("sample*.png"))) == 3
            assert (here / f"m{j:02d}" / "std.png").is_file()
        assert (
            not (here / "m03" / "std.png").exists() and (here / "m03" / "sample00000.png").is_file()
        )
    gt = iio.imread(rep / "images" / "000000" / "gt.png")
    assert np.array_equal(gt, iio.imread(hr_dir / "0801.png"))
    thumb = iio.imread(rep / "images" / "000000" / "m00" / "thumb_sample00000.png")
    assert max(thumb.shape[:2]) <= 160


def test_report_without_lpips_plots_what_it_can(tmp_path, capsys, plotted):
    hr_dir, sweep, _ = sweep_world(tmp_path, n=2)
    rep = tmp_path / "report"
    args = ["--hr", hr_dir, "--sr", sweep, "--scale", 4, "--n", 2, "--no-lpips", "--report", rep]
    assert sr_eval.main([str(a) for a in args]) == 0
    text = (rep / "index.html").read_text()
    assert "not computed (--no-lpips)" in text
    assert "no plot of Diversity score vs LPIPS or LR-PSNR vs LPIPS" in text
    assert [r for r in page_refs(rep / "index.html") if r.startswith("plots/")] == [
        "plots/lrpsnr_vs_psnr.png"
    ] * 2
    assert len(plotted) == 1 and len(plotted[0]["points"]) == 3
    assert sorted(t for t, *_ in plotted[0]["labels"]) == ["sweep@T0", "sweep@T0.5", "sweep@T1"]


def files_in(folder: Path) -> dict[Path, bytes]:
    """The files under `folder` but the mark of an earlier report set aside (DIR/old)."""
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*")
            if p.is_file() and p.name != sr_eval.REPORT_OLD_MARK}  # fmt: skip


def confined_to(folder: Path, monkeypatch, errno: int, why: str) -> None:
    """Path.mkdir and Path.rename fail with `errno` where they would make a name outside `folder`:
    a writable report folder in a read-only parent (EACCES) or on a file system of its own, a
    mount point (EXDEV), where root (whom a chmod does not stop) runs the tests too."""
    mkdir, rename = Path.mkdir, Path.rename
    outside = lambda p: not Path(p).resolve().is_relative_to(folder.resolve())  # noqa: E731

    def no_mkdir(path, *args, **kwargs):
        if outside(path) and not path.exists():
            raise OSError(errno, why)
        return mkdir(path, *args, **kwargs)

    def no_rename(path, target):
        if outside(target):
            raise OSError(errno, why)
        return rename(path, target)

    monkeypatch.setattr(Path, "mkdir", no_mkdir)
    monkeypatch.setattr(Path, "rename", no_rename)


@pytest.mark.parametrize("parent", ["writable", "read-only", "another file system"])
def test_a_rerun_that_stops_keeps_the_earlier_report_aside_and_no_page_of_its_own(
    tmp_path, capsys, monkeypatch, parent
):
    """A rerun into a report folder replaces its images one by one; one that stopped midway (a
    bad sample of the second image) left the earlier index.html, which showed the new run's
    samples under the earlier run's method names; then its page was deleted before the first
    file, so a rerun that failed lost the earlier report; then (c97dd7c) it was moved to a new
    folder DIR.old beside DIR, which a read-only parent or a DIR that is a mount point refused:
    every rerun stopped with exit 7 before its first image. The earlier report (index.html,
    plots/, images/) is now moved into a new folder DIR/old (old2, ... where taken) when the
    scoring starts, which needs DIR alone; the error line says where, and a run that completes
    deletes the folder it made; the files written before the stop go. (A wrong size stops a run
    before its first file: sr_eval.check_headers.)"""
    hr_dir, sweep, bic = sweep_world(tmp_path, n=2)
    rep = tmp_path / "report"
    base = ["--hr", hr_dir, "--scale", 4, "--n", 2, "--no-lpips", "--report", rep, "--quiet"]
    first = [str(a) for a in [*base, "--sr", f"first={sweep / 'T0'}"]]
    second = [str(a) for a in [*base, "--sr", f"second={sweep / 'T1'}"]]
    assert sr_eval.main(first) == 0
    earlier = files_in(rep)
    assert "first" in earlier[Path("index.html")].decode()
    if parent == "read-only":
        confined_to(rep, monkeypatch, 13, "Permission denied")
    elif parent == "another file system":
        confined_to(rep, monkeypatch, 18, "Invalid cross-device link")
    bad = sweep / "T1" / f"{STEMS[1]}_sample00001.png"  # truncated: its header is whole
    whole = bad.read_bytes()
    bad.write_bytes(whole[:100])
    with pytest.raises(SystemExit) as e:
        sr_eval.main(second)
    err = capsys.readouterr().err.splitlines()
    assert e.value.code == 3 and len(err) == 1, err
    went = f"; {rep / 'index.html'} (an earlier run's) moved to {rep / 'old' / 'index.html'}"
    assert err[0].endswith(went), err
    assert sorted(p.name for p in rep.iterdir()) == ["old"]  # no page, no half of the new files
    old = rep / "old"
    assert files_in(old) == earlier
    assert all((old / ref).is_file() for ref in page_refs(old / "index.html"))

    bad.write_bytes(whole)
    # nothing to move aside; the earlier report in old, which the stopped run would have
    # deleted, is deleted too (it stayed: each stop after a complete run left one more, old2,
    # old3, ...); a folder of the user's named so (no mark in it) stays
    (rep / "old2").mkdir()
    (rep / "old2" / "index.html").write_text("the user's\n")
    assert sr_eval.main(second) == 0
    assert "second" in (rep / "index.html").read_text()
    assert sorted(p.name for p in rep.iterdir()) == ["images", "index.html", "old2", "plots"]
    (rep / "old2" / "index.html").unlink()
    (rep / "old2").rmdir()
    assert sr_eval.main(first) == 0  # moved to old while it works, deleted at the end
    assert sorted(p.name for p in rep.iterdir()) == ["images", "index.html", "plots"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("report")] == ["report"]
    assert files_in(rep) == earlier  # (the same command: none of the second run's files is left)


def a_report(tmp_path) -> tuple[Path, list[str], dict[Path, bytes]]:
    """tmp_path/report made by a run of `argv` (a sweep's T0, N = 2); its files."""
    hr_dir, sweep, _ = sweep_world(tmp_path, n=2)
    rep = tmp_path / "report"
    argv = ["--hr", hr_dir, "--sr", sweep / "T0", "--scale", 4, "--n", 2, "--no-lpips",
            "--report", rep, "--quiet"]  # fmt: skip
    argv = [str(a) for a in argv]
    assert sr_eval.main(argv) == 0
    return rep, argv, files_in(rep)


def test_an_earlier_report_that_cannot_be_moved_aside_stays_whole(tmp_path, capsys, monkeypatch):
    """Where a part of the earlier report cannot be moved to DIR/old (images/ a mount point of
    its own: EXDEV), the parts moved before go back: one line, exit 7, the earlier report whole
    in its folder and no DIR/old."""
    rep, argv, earlier = a_report(tmp_path)
    rename = Path.rename

    def no_images(path, target):
        if Path(target).name == "images":
            raise OSError(18, "Invalid cross-device link")
        return rename(path, target)

    monkeypatch.setattr(Path, "rename", no_images)
    with pytest.raises(SystemExit) as e:
        sr_eval.main(argv)
    said = (f"sr_eval.py: error: --report {rep}: cannot move the earlier report aside to "
            f"{rep / 'old'} (Invalid cross-device link); move or delete it\n")  # fmt: skip
    assert (e.value.code, capsys.readouterr().err) == (7, said)
    assert files_in(rep) == earlier
    assert sorted(p.name for p in rep.iterdir()) == ["images", "index.html", "plots"]


def test_a_linked_index_html_stays_a_link_and_its_target_gets_the_new_page(
    tmp_path, capsys, monkeypatch
):
    """DIR/index.html a symbolic link (to a page served from another folder): a rerun moved the
    link itself into DIR/old, where its relative target led nowhere, and wrote its page as a
    file in its place: the link was gone and the served page stayed the earlier run's. Now as
    every output written through a link (sr_lib.data.write_target): the link stays and its
    target gets the new page; meanwhile the earlier page's bytes wait in DIR/old/index.html
    beside its images and plots (a stop leaves them there whole, and no page under the link
    without its images), deleted once the new page is written."""
    rep, argv, earlier = a_report(tmp_path)
    site = tmp_path / "site"
    site.mkdir()
    (rep / "index.html").rename(site / "page.html")
    (rep / "index.html").symlink_to(Path("..") / "site" / "page.html")
    test_eval_cli.stop_at_image(monkeypatch, STEMS[1])
    code, err = test_eval_cli.fails(capsys, *argv)
    went = f"{rep / 'index.html'} (an earlier run's) moved to {rep / 'old' / 'index.html'}"
    assert code == 75 and err.strip().endswith(went), err
    assert (rep / "index.html").is_symlink() and not (site / "page.html").exists()
    assert not (rep / "old" / "index.html").is_symlink() and files_in(rep / "old") == earlier
    assert sorted(p.name for p in rep.iterdir()) == ["index.html", "old"]
    monkeypatch.undo()
    assert sr_eval.main(argv) == 0  # (the same command: the same page)
    assert os.readlink(rep / "index.html") == os.path.join("..", "site", "page.html")
    assert (site / "page.html").read_bytes() == earlier[Path("index.html")]
    assert sorted(p.name for p in rep.iterdir()) == ["images", "index.html", "plots"]
    assert sr_eval.main(argv) == 0  # (an earlier page there: moved aside through the link)
    assert (rep / "index.html").is_symlink() and files_in(rep) == earlier
    rename = Path.rename  # images/ cannot be moved: the page goes back through the link

    def no_images(path, target):
        if Path(target).name == "images":
            raise OSError(18, "Invalid cross-device link")
        return rename(path, target)

    monkeypatch.setattr(Path, "rename", no_images)
    assert test_eval_cli.fails(capsys, *argv)[0] == 7
    assert (rep / "index.html").is_symlink() and files_in(rep) == earlier
    assert sorted(p.name for p in rep.iterdir()) == ["images", "index.html", "plots"]


def test_a_linked_index_html_that_leads_nowhere_is_refused_before_any_work(
    tmp_path, capsys, monkeypatch
):
    """DIR/index.html a link into a folder that does not exist (or a loop of links): every
    image was scored, then the page could not be written through it (exit 7, the scores lost).
    Now one line naming the link, before any image is scored."""
    rep, argv, _ = a_report(tmp_path)
    for part in ("images", "plots"):
        shutil.rmtree(rep / part)
    (rep / "index.html").unlink()
    calls = test_eval_cli.stop_at_image(monkeypatch, "none")
    for target in (tmp_path / "gone" / "page.html", rep / "index.html"):
        (rep / "index.html").symlink_to(target)
        code, err = test_eval_cli.fails(capsys, *argv)
        assert code == 7 and err.startswith(f"sr_eval.py: error: {rep / 'index.html'}: a ")
        assert err.count("\n") == 1 and calls == [] and (rep / "index.html").is_symlink()
        (rep / "index.html").unlink()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_while_the_earlier_report_is_moved_aside_keeps_it_whole(
    tmp_path, capsys, monkeypatch, sig
):
    """A stop (SIGTERM, Ctrl-C) that came after the earlier report's index.html was moved into
    DIR/old but before its images/ and plots/ were: the stopped run then deleted DIR/images and
    DIR/plots as its own unfinished report's (no index.html was left in DIR), so DIR/old held a
    page whose 22 links all pointed at nothing, and the stop's line did not say where the page
    went. The move is one step now, the stop comes at its end: the earlier report whole in
    DIR/old, and the line says so."""
    rep, argv, earlier = a_report(tmp_path)
    rename = Path.rename

    def stop_after_the_page(path, target):
        rename(path, target)
        if Path(target).name == "index.html":  # the first part moved
            os.kill(os.getpid(), sig)
        return Path(target)

    monkeypatch.setattr(Path, "rename", stop_after_the_page)
    with pytest.raises((SystemExit, KeyboardInterrupt)) as e:
        sr_eval.main(argv)
    err = capsys.readouterr().err.splitlines()
    went = f"{rep / 'index.html'} (an earlier run's) moved to {rep / 'old' / 'index.html'}"
    if sig == signal.SIGTERM:
        assert e.value.code == 75 and len(err) == 1 and err[0].endswith(went), err
    else:
        assert went in "\n".join(err), err
    assert sorted(p.name for p in rep.iterdir()) == ["old"]
    old = rep / "old"
    assert files_in(old) == earlier
    assert all((old / ref).is_file() for ref in page_refs(old / "index.html"))


@pytest.mark.parametrize("where", ["--hr", "--sr", "--lr", "a link"])
def test_inputs_in_the_reports_own_parts_are_refused_before_any_work(tmp_path, capsys, where):
    """--hr R/images --report R (a data folder that keeps its images in images/): the report
    wrote its panels among them, a run that stopped deleted them with its half report, and a
    rerun moved them aside with the earlier report ("no such file"). An input that lies in
    R/index.html, R/images or R/plots (a folder, or a file through a link) is refused now: one
    line naming its flag, exit 2, before anything is read or written."""
    hr_dir, sweep, _ = sweep_world(tmp_path, n=2)
    rep = tmp_path / "report"
    src = {"--hr": hr_dir, "--sr": sweep / "T0", "--lr": sweep / "lr"}
    inside = {"--hr": rep / "images", "--sr": rep / "plots" / "T0", "--lr": rep / "images" / "lr"}
    if where == "a link":  # samples outside R, links to files in R/images
        inside["--sr"] = rep / "images" / "T0"
        inside["--sr"].parent.mkdir(parents=True)
        (sweep / "T0").rename(inside["--sr"])
        src["--sr"].mkdir()
        for f in inside["--sr"].iterdir():
            (src["--sr"] / f.name).symlink_to(f)
    else:
        inside[where].parent.mkdir(parents=True, exist_ok=True)
        src[where].rename(inside[where])
        src[where] = inside[where]
    before = files_in(tmp_path)
    argv = ["--hr", src["--hr"], "--sr", src["--sr"], "--lr", src["--lr"], "--scale", 4, "--n",
            2, "--no-lpips", "--report", rep, "--quiet"]  # fmt: skip
    with pytest.raises(SystemExit) as e:
        sr_eval.main([str(a) for a in argv])
    err = capsys.readouterr().err.splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    flag = "--sr" if where == "a link" else where
    assert err[0].startswith(f"sr_eval.py: error: {flag} {src[flag]}"), err
    part = inside[flag].relative_to(rep).parts[0]
    assert f"lies in {rep / part}, which --report {rep} writes" in err[0], err
    assert files_in(tmp_path) == before  # nothing written, moved or deleted
    assert not (rep / "index.html").exists()


@pytest.mark.parametrize("part", ["images", "plots"])
def test_a_report_folder_with_images_or_plots_but_no_page_is_refused(tmp_path, capsys, part):
    """--report R where R/images (or R/plots) is there without R/index.html: the user's own
    files, or what a killed run (SIGKILL) left. No earlier report is moved aside (no page), so a
    run wrote its panels among those files (replacing any of the same name) and a run that
    stopped (here a bad sample of the second image) deleted R/images and R/plots whole, the
    user's files with them. The run cannot tell whose they are: it is refused now, one line
    naming the folder, exit 2, before anything is read or written."""
    hr_dir, sweep, _ = sweep_world(tmp_path, n=2)
    rep = tmp_path / "report"
    (rep / part / "000000").mkdir(parents=True)
    (rep / part / "notes.txt").write_text("mine")
    (rep / part / "000000" / "gt.png").write_bytes(b"mine too")
    bad = sweep / "T0" / f"{STEMS[1]}_sample00001.png"  # truncated: its header is whole
    bad.write_bytes(bad.read_bytes()[:100])
    before = files_in(tmp_path)
    argv = ["--hr", hr_dir, "--sr", sweep / "T0", "--scale", 4, "--n", 2, "--no-lpips",
            "--report", rep, "--quiet"]  # fmt: skip
    with pytest.raises(SystemExit) as e:
        sr_eval.main([str(a) for a in argv])
    err = capsys.readouterr().err.splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert err[0].startswith(f"sr_eval.py: error: --report {rep}: {rep / part} is there but no "
                             f"{rep / 'index.html'}"), err  # fmt: skip
    assert files_in(tmp_path) == before  # nothing written, moved or deleted


def test_a_report_whose_index_html_is_a_link_to_a_missing_file_names_the_link(tmp_path, capsys):
    """--report R where R/index.html is a symbolic link to a missing file (its page deleted, a
    disk not mounted) beside R/plots: refused, as no page, but its line said 'R/plots is there but
    no R/index.html', where the user sees an index.html. Now it says the link leads to a missing
    file and names its target; nothing is written, moved or deleted."""
    hr_dir, sweep, _ = sweep_world(tmp_path, n=2)
    rep = tmp_path / "report"
    (rep / "plots").mkdir(parents=True)
    (rep / "index.html").symlink_to(tmp_path / "www" / "page.html")
    (tmp_path / "www").mkdir()  # (a folder the page could be written in: only its file gone)
    before = files_in(tmp_path)
    argv = ["--hr", hr_dir, "--sr", sweep / "T0", "--scale", 4, "--n", 2, "--no-lpips",
            "--report", rep, "--quiet"]  # fmt: skip
    with pytest.raises(SystemExit) as e:
        sr_eval.main([str(a) for a in argv])
    assert e.value.code == 2
    assert capsys.readouterr().err == (
        f"sr_eval.py: error: --report {rep}: {rep / 'plots'} is there, but {rep / 'index.html'} "
        f"is {link_to_nothing(rep / 'index.html')}, so no page "
        "tells whose files it holds; the report would write among them and a stopped run delete "
        f"them: restore the link's target, move or delete {rep / 'plots'}, or give --report "
        "another folder\n"
    )
    assert files_in(tmp_path) == before and os.readlink(rep / "index.html") == str(
        tmp_path / "www" / "page.html"
    )


def test_a_users_own_index_html_is_refused_and_kept(tmp_path, capsys):
    """--report R where R/index.html is the user's own page (beside their own images/): it was
    taken for an earlier report, moved into R/old with images/ and deleted once the new page
    was written, exit 0. A page of sr_eval.py carries report.GENERATOR in its head now; one
    without it is refused, one line naming it, exit 2, nothing read or written."""
    hr_dir, sweep, _ = sweep_world(tmp_path, n=2)
    rep = tmp_path / "album"
    (rep / "images").mkdir(parents=True)
    (rep / "index.html").write_text(
        "<!DOCTYPE html>\n<html><head><title>My photos</title>"
        "</head><body><img src='images/cat.jpg'></body></html>\n"
    )
    (rep / "images" / "cat.jpg").write_bytes(b"mine")
    before = files_in(tmp_path)
    argv = ["--hr", hr_dir, "--sr", sweep / "T0", "--scale", 4, "--n", 2, "--no-lpips",
            "--report", rep, "--quiet"]  # fmt: skip
    with pytest.raises(SystemExit) as e:
        sr_eval.main([str(a) for a in argv])
    said = (
        f"sr_eval.py: error: --report {rep}: {rep / 'index.html'} is not a page of "
        f"sr_eval.py (no {sr_lib.report.GENERATOR} in its head); the report would move it "
        f"to {rep / 'old'} and delete it: move it away, or give --report another folder\n"
    )
    assert (e.value.code, capsys.readouterr().err) == (2, said)
    assert files_in(tmp_path) == before and not (rep / "old").exists()


def test_a_page_of_an_earlier_srspace_is_taken_for_a_report(tmp_path, capsys):
    """Pages written before report.GENERATOR (2026-12-04 on) have no mark; they all begin with
    the same two lines and hold the same results-table head, and are replaced by a rerun as
    before. What has neither the mark nor that structure is not a report's page."""
    rep, argv, earlier = a_report(tmp_path)
    page = (rep / "index.html").read_text()
    assert page.count(sr_lib.report.GENERATOR) == 1
    then = page.replace(sr_lib.report.GENERATOR, "")  # a page as written before the mark
    (rep / "index.html").write_text(then)
    assert sr_eval.main(argv) == 0  # replaced, the earlier one (moved to old/) deleted
    assert sorted(p.name for p in rep.iterdir()) == ["images", "index.html", "plots"]
    assert sr_lib.report.GENERATOR in (rep / "index.html").read_text()
    is_page = sr_lib.report.is_report_page
    other = tmp_path / "other.html"
    for text in (then.split("<style>")[0], then.replace("<th>method</th>", "<th>name</th>"), ""):
        other.write_text(text)
        assert not is_page(other), text[:80]
    other.write_bytes(b"\xff\xfe<\x00h\x00")  # (UTF-16: not a page of ours either)
    assert not is_page(other)
    other.write_text(page.split("</head>")[0])  # the mark in the head is enough
    assert is_page(other)
    other.write_text("<html><head></head><body>" + sr_lib.report.GENERATOR)  # not in the head
    assert not is_page(other) and not is_page(tmp_path) and not is_page(tmp_path / "none")


def test_the_half_report_of_a_killed_run_is_deleted_by_the_next_run(tmp_path, capsys):
    """A run killed before its page (SIGKILL, the out-of-memory killer: no code of it runs; here
    os._exit where the page would be written) left R/images and R/plots without R/index.html,
    which the next run refused as files it cannot tell from the user's. It left its mark
    R/.sr_eval_unfinished too: the next run deletes that half report and writes its own."""
    hr_dir, sweep, _ = sweep_world(tmp_path, n=2)
    rep = tmp_path / "report"
    argv = ["--hr", hr_dir, "--sr", sweep / "T0", "--scale", 4, "--n", 2, "--no-lpips",
            "--report", rep, "--quiet"]  # fmt: skip
    killed = ("import os, sys, sr_eval; from sr_lib import report; "
              "report.write_report = lambda *a, **k: os._exit(137); "
              "sys.exit(sr_eval.main(sys.argv[1:]))")  # fmt: skip
    p = subprocess.run([sys.executable, "-c", killed, *map(str, argv)], cwd=REPO,
                       capture_output=True, text=True)  # fmt: skip
    assert p.returncode == 137, p.stderr
    assert (rep / "images").is_dir() and (rep / ".sr_eval_unfinished").is_file()
    assert not (rep / "index.html").exists()
    (rep / "images" / "000000" / "left.png").write_bytes(b"the killed run's")
    assert sr_eval.main([str(a) for a in argv]) == 0
    assert capsys.readouterr().err == ""
    assert (rep / "index.html").is_file() and not (rep / ".sr_eval_unfinished").exists()
    assert not (rep / "images" / "000000" / "left.png").exists()
    assert not (rep / "old").exists()  # (no earlier page: nothing moved aside)


def test_a_second_run_into_a_report_folder_in_use_is_refused(tmp_path, capsys):
    """Two sr_eval.py runs writing one --report R at once: the later page replaced the earlier
    run's, which had said it was written, R/images held both runs' panels under one page's
    names, and a stop of either deleted the other's images/. R is locked for a run (a flock
    on the folder itself, no file): a second run is one line, exit 2, before it
    moves or writes anything; once the first ends, the same command runs."""
    hr_dir, sweep, _ = sweep_world(tmp_path, n=2)
    rep = tmp_path / "report"
    argv = [str(a) for a in ["--hr", hr_dir, "--sr", sweep / "T0", "--scale", 4, "--n", 2,
                             "--no-lpips", "--report", rep, "--quiet"]]  # fmt: skip
    assert sr_eval.main(argv) == 0  # an earlier report
    before = files_in(rep)
    hold = (
        "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); "
        "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.read()"
    )
    other = subprocess.Popen([sys.executable, "-c", hold, str(rep)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert other.stdout.readline() == "held\n"
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            sr_eval.main(argv)
        err = capsys.readouterr().err.splitlines()
        assert e.value.code == 2 and err == [
            f"sr_eval.py: error: --report {rep}: another sr_eval.py writes its report there; "
            "wait for it to end or give another --report"
        ]
        assert files_in(rep) == before  # nothing moved or written
    finally:
        other.communicate("")
    assert sr_eval.main(argv) == 0
    assert (rep / "index.html").is_file() and not (rep / "old").exists()


def test_a_report_on_a_full_disk_leaves_none_of_its_files(tmp_path):
    """A disk that fills while the report is written (here a 1 kB file size limit, EFBIG as
    ENOSPC: the first image's GT thumbnail) left images/000000/ with its LR and GT, a partial
    report; now one line, exit 7, and the report folder as empty as before the run."""
    hr_dir, _, sr_dir = test_eval_cli.make_set(tmp_path, n=2)
    rep = tmp_path / "report"

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))

    cmd = test_eval_cli.eval_cmd("--hr", hr_dir, "--sr", sr_dir, "--scale", 4, "--n", 2,
                                 "--no-lpips", "--report", rep)  # fmt: skip
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, preexec_fn=small_files)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 7 and len(err) == 1, p.stderr
    assert "thumb_gt.png: cannot write (File too large)" in err[0]
    assert list(rep.iterdir()) == []


def test_a_sweep_folder_with_a_top_level_run_and_auto_names(tmp_path, capsys):
    """A folder with samples at its top and T subfolders gives both; two folders of one name
    are told apart; NAME=DIR:N overrides --n for that folder only."""
    hr_dir, sweep, bic = sweep_world(tmp_path / "a", n=2)
    for f in (sweep / "T0.5").iterdir():
        (sweep / f.name).write_bytes(f.read_bytes())
    other = tmp_path / "b" / "sweep"
    other.mkdir(parents=True)
    for f in (sweep / "T1").iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "r.json"
    args = ["--hr", hr_dir, "--sr", sweep, other, f"{bic}:1", "--scale", 4, "--n", 2]
    assert sr_eval.main([str(a) for a in [*args, "--no-lpips", "--out", out]]) == 0
    res = json.loads(out.read_text())["methods"]
    assert list(res) == ["sweep", "sweep@T0", "sweep@T0.5", "sweep@T1", "sweep_1", "bicubic"]
    assert res["sweep"]["temperature"] == 0.5 and res["sweep_1"]["temperature"] == 1.0
    assert res["sweep"]["mean"] == res["sweep@T0.5"]["mean"]
    assert res["bicubic"]["n"] == 1 and res["sweep_1"]["n"] == 2


def test_a_name_given_keeps_it_whatever_the_order_of_the_sr_flags(tmp_path):
    """--sr a/sr --sr sr=b/sr: the folder named after itself becomes sr_1, as in the other
    order. Before, this order was refused ("the method name 'sr' is given twice"), where the
    user gave it once; two folders given one NAME are still refused."""
    a, b = tmp_path / "a" / "sr", tmp_path / "b" / "sr"
    for d in (a, b, b / "T1"):  # (b: a sweep, whose row sr@T1 is NAME's too)
        d.mkdir(parents=True)
    names = lambda *specs: [m.name for m in sr_eval.expand_methods(list(specs), 2)]  # noqa: E731
    assert names(str(a), f"sr={b / 'T1'}") == ["sr_1", "sr"]
    assert names(f"sr={b / 'T1'}", str(a)) == ["sr", "sr_1"]
    assert names(str(a), str(a), f"sr_1={b / 'T1'}") == ["sr", "sr_2", "sr_1"]
    assert names(str(b), f"sr@T1={a}") == ["sr@T1_1", "sr@T1"]  # (b's row, named after it)
    with pytest.raises(sr_eval.UsageError, match="'sr@T1' is given twice"):
        sr_eval.expand_methods([f"sr@T1={a}", f"sr={b}"], 2)
    # a link is named as typed (it was named after its target), '.' and '..' after their folder
    (tmp_path / "latest").symlink_to(a, target_is_directory=True)
    assert names(str(tmp_path / "latest"), f"{tmp_path / 'latest'}/") == ["latest", "latest_1"]
    assert names(f"{a}/.", f"{a}/../sr", f"{a}/../../a/sr") == ["sr", "sr_1", "sr_2"]


def test_the_table_meets_a_closed_pipe_as_an_error_not_an_exit():
    """rich's own write turns a BrokenPipeError into SystemExit(1), silently: `sr_eval.py ... |
    head` ending at the table gave exit 1 and lost the warning (and exit 7) that a closed stdout
    gets elsewhere. The table is written as text, so the error reaches `unless_stdout_closed`."""

    class ClosedPipe(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

    methods = [sr_eval.Method("a", Path("."), 2, None)]
    means = {"a": {"LPIPS_mean": 0.1, "score": 1.0}}
    console = Console(width=100, file=ClosedPipe(), color_system=None)
    with pytest.raises(BrokenPipeError):
        sr_eval.print_table(means, ["LPIPS_mean", "score"], "x4", methods, console)


def test_the_table_shows_each_rows_temperature_where_one_is_known():
    """The docstring said each method carries its temperature in the table; the console table
    had no temperature column (only a sweep's NAME@T names showed one; a single folder's, from
    its manifest.json, was in no row). A T column now follows the method (and N) where some
    row's temperature is known, as on the report's page: '-' where none is; none at all where
    no row has one."""
    columns = ["LPIPS_mean", "score"]
    methods = [
        sr_eval.Method("flow", Path("."), 10, 0.9),
        sr_eval.Method("bicubic", Path("."), 1, None),
    ]
    means = {
        "flow": {"LPIPS_mean": 0.25, "score": 20.5},
        "bicubic": {"LPIPS_mean": 0.4, "score": 0.0},
    }
    console = Console(width=100, file=io.StringIO(), color_system=None)
    sr_eval.print_table(means, columns, "x4, N per method, 2 images", methods, console)
    lines = console.file.getvalue().replace("┃", "│").splitlines()
    rows = [line.split("│")[1:-1] for line in lines if "│" in line]
    assert [[c.strip() for c in r] for r in rows] == [
        ["method", "N", "T", "LPIPS_mean", "score"],
        ["flow", "10", "0.9", "0.2500", "20.50"],
        ["bicubic", "1", "-", "0.4000", "0.00"],
    ]
    console = Console(width=100, file=io.StringIO(), color_system=None)
    methods[0].temperature = None
    sr_eval.print_table(means, columns, "x4, N per method, 2 images", methods, console)
    assert " T " not in console.file.getvalue() and "0.9" not in console.file.getvalue()


@pytest.mark.parametrize("width", [80, 160])
def test_table_is_readable_at_80_and_160_columns(width):
    """Every method name and every number appears whole on its row; no line is wider than
    the console (the columns are stacked into several tables when needed)."""
    columns = ["LPIPS_mean", "LRPSNR_worst", "LRPSNR_mean", "score", "PSNR_mean", "PSNR_best"]
    columns += ["SSIM_mean", "LRPSNR_vs_input_mean"]
    rng = np.random.default_rng(0)
    methods = [sr_eval.Method(f"srflow_div2k_x4_step{s}k@T{t:g}", Path("."), 10, t)
               for s in (120, 200) for t in (0.0, 0.9)]  # fmt: skip
    methods.append(sr_eval.Method("bicubic", Path("."), 1, None))
    means = {
        m.name: {c: float(rng.uniform(0.01, 0.9) if c.startswith(("LPIPS", "SSIM"))
                          else rng.uniform(10, 99.9)) for c in columns}
        for m in methods
    }  # fmt: skip
    means["bicubic"]["LRPSNR_mean"] = float("inf")
    console = Console(width=width, file=io.StringIO(), color_system=None)
    sr_eval.print_table(means, columns, "x4, N per method, 100 images", methods, console)
    text = console.file.getvalue()
    lines = text.splitlines()
    assert all(len(line) <= width for line in lines)
    assert all(c in text for c in columns)
    for m in methods:
        rows = [line for line in lines if f" {m.name} " in line]
        assert rows, m.name
        cells = " ".join(rows)
        for c in columns:
            assert f" {sr_eval.report.fmt(means[m.name][c], c)} " in cells, (m.name, c)
        assert f" {m.n} " in cells
    assert (text.count("┏") > 1) == (width == 80)  # stacked at 80 columns, one table at 160


def test_progress_bar_on_a_terminal(tmp_path):
    """On a TTY: a rich progress bar with images done / total and an ETA (no log lines)."""
    hr_dir, sweep, _ = sweep_world(tmp_path, n=2)
    main, child = pty.openpty()
    cmd = [sys.executable, str(REPO / "sr_eval.py"), "--hr", str(hr_dir), "--sr",
           str(sweep / "T1"), "--scale", "4", "--n", "2", "--no-lpips",
           "--device", "cpu"]  # fmt: skip
    env = dict(os.environ, COLUMNS="120", TERM="xterm")
    p = subprocess.Popen(cmd, cwd=REPO, stdout=child, stderr=child, env=env)
    os.close(child)
    chunks = []
    while True:
        try:
            data = os.read(main, 4096)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    p.wait(timeout=60)
    os.close(main)
    text = b"".join(chunks).decode(errors="replace")
    assert p.returncode == 0, text
    assert "2/2" in text and "ETA" in text and "[1/2]" not in text


def test_without_matplotlib_eval_runs_and_report_is_one_line(tmp_path, capsys, monkeypatch):
    """matplotlib draws the report's plots only, but sr_eval.py imported it at start: without
    it every run was an ImportError traceback, --report or not. (The run without --report in a
    fresh process, where the script's imports happen; --report's line here, with matplotlib
    blocked in this process too.)"""
    hr_dir, sweep, _ = sweep_world(tmp_path, n=2)
    blocked = "import sys, runpy; sys.modules['matplotlib'] = None; sys.argv = sys.argv[1:]; "
    blocked += "runpy.run_path(sys.argv[0], run_name='__main__')"
    args = ["--hr", hr_dir, "--sr", sweep / "T1", "--scale", 4, "--n", 2, "--no-lpips"]
    cmd = [sys.executable, "-c", blocked, REPO / "sr_eval.py", *args]
    ran = subprocess.run([str(a) for a in cmd], cwd=REPO, capture_output=True, text=True)
    assert ran.returncode == 0 and ran.stderr == "", ran.stderr
    rep = tmp_path / "report"
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as not installed: an ImportError
    with pytest.raises(SystemExit) as e:
        sr_eval.main([str(a) for a in [*args, "--report", rep]])
    assert e.value.code == 2 and capsys.readouterr().err == (
        "sr_eval.py: error: --report needs the matplotlib package (its plots): pip install "
        "matplotlib, or leave --report out\n"
    )
    assert not rep.exists()  # checked before any work


def test_real_sweep_from_sr_sample_then_report(tmp_path, capsys, lpips_file, flow_ckpt):
    """The pipeline of the README: sr_sample.py --temperature sweep (--layout ntire, inputs whose
    names share prefixes and hold spaces), then sr_eval.py --report on the sweep folder."""
    hr_dir = tmp_path / "hr"
    hr_dir.mkdir()
    for k, stem in enumerate(("cat-2", "cat", "photo (1)", "photo")):
        iio.imwrite(hr_dir / f"{stem}.png", make_hr(32, 40, seed=k))
    sweep = tmp_path / "S"
    code = sr_sample.main([str(a) for a in (
        "--ckpt", flow_ckpt, "--input", hr_dir, "--from-hr", "--temperature", 0, 0.5, 1,
        "--n", 3, "--layout", "ntire", "--out", sweep, "--device", "cpu",
    )])  # fmt: skip
    assert code == 0
    assert json.loads((sweep / "T0.5" / "ntire_index.json").read_text())["000001"] == "cat-2"
    out, rep = tmp_path / "r.json", tmp_path / "R"
    code = sr_eval.main([str(a) for a in (
        "--hr", hr_dir, "--sr", f"flow={sweep}", "--lr", sweep / "lr", "--scale", 4, "--n", 3,
        "--lpips-weights", lpips_file, "--device", "cpu", "--out", out, "--report", rep,
    )])  # fmt: skip
    assert code == 0
    res = json.loads(out.read_text())["methods"]
    assert list(res) == ["flow@T0", "flow@T0.5", "flow@T1"]
    assert [r["image"] for r in res["flow@T1"]["per_image"]] == ["cat", "cat-2", "photo",
                                                                  "photo (1)"]  # fmt: skip
    assert res["flow@T0"]["mean"]["score"] == 0  # temperature 0: n identical samples
    assert res["flow@T1"]["mean"]["score"] > 0
    for m in res.values():  # the LR sr_sample made is the official one: both LR-PSNRs agree
        mean = m["mean"]
        assert mean["LRPSNR_vs_input_mean"] == pytest.approx(mean["LRPSNR_mean"], abs=1e-6)
    refs = page_refs(rep / "index.html")
    assert all((rep / r).is_file() for r in refs)
    assert len(list((rep / "images").iterdir())) == 4


def test_labels_of_coinciding_points_are_stacked(tmp_path, monkeypatch):
    """Two rows at (nearly) the same point: their labels are drawn one above the other, not over
    each other; a distant point keeps the usual offset."""
    from sr_lib.report import trade_off_plot

    offsets = {}
    annotate = Axes.annotate

    def spy(ax, text, xy, *a, **k):
        offsets[text] = k["xytext"]
        return annotate(ax, text, xy, *a, **k)

    monkeypatch.setattr(Axes, "annotate", spy)
    table = [("edsr", None, 1, {"LPIPS_mean": 0.1200, "score": 0.0}),
             ("flow@T0", 0.0, 10, {"LPIPS_mean": 0.1201, "score": 0.0}),
             ("bicubic", None, 1, {"LPIPS_mean": 0.2, "score": 0.0})]  # fmt: skip
    points, left_out = trade_off_plot(table, "score", "LPIPS_mean", "t", tmp_path / "p.png")
    assert len(points) == 3 and not left_out and (tmp_path / "p.png").is_file()
    assert offsets["edsr"] != offsets["flow@T0"] and offsets["bicubic"] == (4, 4)
