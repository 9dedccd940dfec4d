"""One wording of a path of the wrong kind in every script: each path flag given a path that is
not there, a symbolic link to nothing, a loop of links, a file for a folder or a folder for a
file says `sr_lib.data.describe_path`'s phrase after "FLAG PATH: ", with the exit code of its
flag (3 data, 6 checkpoint, 7 output). sr_eval.py said "a symbolic link to a missing folder",
sr_sample.py "... to a missing file", sr_train.py "a symbolic link to nothing (-> X)"."""

import errno
import io
import os
import re
import subprocess
import warnings
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from rich.console import Console
from rich.progress import Progress

import sr_eval
import sr_lib.data
import sr_sample
import sr_train
from sr_lib import errors
from sr_lib.checkpoint import save_checkpoint
from sr_lib.data import describe_path, link_to_nothing, list_images, shell_quote
from sr_lib.errors import CheckpointError, DataError, exit_on_error
from sr_lib.models import build_model

TRAIN = ["--model", "edsr", "--n-feats", "8", "--n-blocks", "1", "--scale", "2", "--patch", "8",
         "--batch", "2", "--steps", "1", "--workers", "0", "--val-every", "0"]  # fmt: skip
EVAL = ["--scale", "4", "--n", "1", "--no-lpips"]

# (script, flag, what it wants, exit code, argv with P for the path, the faults tried)
FOLDER_FAULTS = ("missing", "dangling", "loop", "file")
FILE_FAULTS = ("missing", "dangling", "loop", "folder")  # (a checkpoint or weights file)
FLAGS = [
    (sr_train, "--data", "folder", 3, [*TRAIN, "--data", "P", "--out", "o"], FOLDER_FAULTS),
    (sr_train, "--lr-data", "folder", 3,
     [*TRAIN, "--data", "hr", "--lr-data", "P", "--out", "o"], FOLDER_FAULTS),
    (sr_train, "--val-data", "folder", 3,
     [*TRAIN, "--data", "hr", "--val-data", "P", "--val-every", "1", "--out", "o"], FOLDER_FAULTS),
    (sr_train, "--resume", "file", 6, [*TRAIN, "--data", "hr", "--resume", "P", "--out", "o"],
     FILE_FAULTS),
    (sr_train, "--init-from", "file", 6,
     [*TRAIN, "--data", "hr", "--init-from", "P", "--out", "o"], FILE_FAULTS),
    (sr_train, "--out", "folder", 7, [*TRAIN, "--data", "hr", "--out", "P"], ("file",)),
    (sr_train, "--cache", "folder", 7, [*TRAIN, "--data", "hr", "--cache", "P", "--out", "o"],
     ("file",)),
    (sr_sample, "--input", "either", 3, ["--ckpt", "ckpt.pt", "--input", "P", "--out", "o"],
     ("missing", "dangling", "loop")),
    (sr_sample, "--ckpt", "file", 6, ["--ckpt", "P", "--input", "lr", "--out", "o"], FILE_FAULTS),
    (sr_sample, "--out", "folder", 7, ["--ckpt", "ckpt.pt", "--input", "lr", "--out", "P"],
     ("file",)),
    (sr_eval, "--hr", "folder", 3, ["--hr", "P", "--sr", "sr", *EVAL], FOLDER_FAULTS),
    (sr_eval, "--sr", "folder", 3, ["--hr", "hr", "--sr", "P", *EVAL], FOLDER_FAULTS),
    (sr_eval, "--lr", "folder", 3, ["--hr", "hr", "--sr", "sr", "--lr", "P", *EVAL], FOLDER_FAULTS),
    (sr_eval, "--uncertainty", "folder", 3,
     ["--hr", "hr", "--sr", "sr", "--uncertainty", "P", *EVAL], FOLDER_FAULTS),
    (sr_eval, "--report", "folder", 7, ["--hr", "hr", "--sr", "sr", "--report", "P", *EVAL],
     ("file", "loop")),
    (sr_eval, "--lpips-weights", "file", 6,
     ["--hr", "hr", "--sr", "sr", "--lpips-weights", "P", *EVAL[:-1]], FILE_FAULTS),
    (sr_eval, "--out", "file", 7, ["--hr", "hr", "--sr", "sr", "--out", "P", *EVAL], ("folder",)),
    (sr_eval, "--csv", "file", 7, ["--hr", "hr", "--sr", "sr", "--csv", "P", *EVAL], ("folder",)),
]  # fmt: skip
CASES = [
    pytest.param(
        script, flag, want, code, argv, fault, id=f"{script.__name__}{flag}-{fault}"
    )  # fmt: skip
    for script, flag, want, code, argv, faults in FLAGS
    for fault in faults
]


@pytest.fixture
def world(tmp_path, monkeypatch):
    """hr/ (one image), lr/ (its x4), sr/ (one sample), ckpt.pt (a bicubic x4), and a path of
    each fault: nowhere, dangling (-> moved/away), loop (-> loop), file.png, folder/."""
    monkeypatch.chdir(tmp_path)
    img = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
    for name, arr in (("hr/a.png", img), ("lr/a.png", img[::4, ::4]),
                      ("sr/000000_sample00000.png", img), ("file.png", img)):  # fmt: skip
        Path(name).parent.mkdir(exist_ok=True)
        iio.imwrite(name, arr)
    Path("folder").mkdir()
    Path("dangling").symlink_to("moved/away")
    Path("loop").symlink_to("loop")
    model = build_model("bicubic", {"scale": 4})
    save_checkpoint(Path("ckpt.pt"), {"model": "bicubic", "model_cfg": {"scale": 4},
                                      "state_dict": model.state_dict(), "step": 0})  # fmt: skip
    return tmp_path


PATHS = {"missing": "nowhere", "dangling": "dangling", "loop": "loop", "file": "file.png",
         "folder": "folder"}  # fmt: skip


@pytest.mark.parametrize("script, flag, want, code, argv, fault", CASES)
def test_one_wording_of_a_path_of_the_wrong_kind(world, capsys, script, flag, want, code, argv,
                                                 fault):  # fmt: skip
    path = PATHS[fault]
    with pytest.raises(SystemExit) as e:
        script.main([path if a == "P" else a for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    builtins = ("demo",) if flag in ("--data", "--val-data", "--input", "--hr") else ()
    examples = {"--out": "out.json", "--csv": "out.csv", "--ckpt": "last.pt",
                "--init-from": "last.pt", "--resume": "last.pt"}  # fmt: skip
    example = examples.get(flag, "") if want == "file" else ""
    said = describe_path(path, want, builtins, example)
    assert said  # (the fault is one)
    if flag == "--resume" and fault == "folder":  # (a run's folder: or that run resumed)
        said += f", or --resume auto --out {path}"
    prog = f"{script.__name__}.py"
    assert err == [f"{prog}: error: {flag} {path}: {said}"], err
    assert e.value.code == code
    assert not Path("o").exists()  # (refused before a run or output folder is made; --cache's
    # was once OUT/ was made, which it left behind)


def test_describe_path_words(tmp_path):
    """Each fault's phrase, which names the link's target (from the link's folder, quoted for a
    shell) and says what to do; "" for a path of the kind asked for."""
    (tmp_path / "dir").mkdir()
    (tmp_path / "f.png").write_text("x")
    (tmp_path / "gone").symlink_to("moved/a b")
    (tmp_path / "loop").symlink_to("loop")
    os.mkfifo(tmp_path / "pipe")
    said = {name: describe_path(tmp_path / name) for name in ("dir", "f.png", "gone", "loop")}
    assert said == {
        "dir": "",
        "f.png": "a file, not a folder; give a folder",
        "gone": f"a symbolic link to '{tmp_path}/moved/a b', which does not exist; put the "
        "folder back there or give its new path",
        "loop": "a loop of symbolic links (it points to loop); point it at a folder",
    }
    assert link_to_nothing(tmp_path / "gone") + "; put the" in describe_path(tmp_path / "gone")
    assert describe_path(tmp_path / "f.png", "file") == describe_path(tmp_path / "dir", "either")
    assert describe_path(tmp_path / "dir", "file", example="r.json") == (
        f"a folder, not a file; give a file, e.g. {tmp_path / 'dir' / 'r.json'}"
    )
    assert describe_path(tmp_path / "nope", "either") == "no such file or folder"
    assert describe_path("demoo", builtins=("demo",)) == "no such folder (did you mean demo?)"
    assert describe_path(tmp_path / "pipe", "file") == (
        "a pipe, not a regular file; save what it gives to a file and give that"
    )
    assert describe_path(tmp_path / "pipe") == "a pipe, not a folder; give a folder"
    # a loop above the path: "point it at" named the path, which is no link ("in its path")
    assert describe_path(tmp_path / "loop" / "x.pt", "file") == (
        "a loop of symbolic links among the folders above it; point that link at a folder or "
        "remove it"
    )


def test_describe_path_of_a_path_that_cannot_be_checked(tmp_path, monkeypatch):
    """A folder above the path that cannot be searched (EACCES; root ignores permission bits, so
    its stat is made to fail): said so, not "no such folder" nor a PermissionError traceback."""

    def denied(path, *a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(sr_lib.data.os, "stat", denied)
    assert describe_path(tmp_path / "x") == (
        "cannot be checked (Permission denied); make it and the folders above it readable"
    )


# (script, flag, argv with P for the path, the path said before the file's part): each output
# flag given a path under a file
UNDER_A_FILE = [
    (sr_train, "--out", [*TRAIN, "--data", "hr", "--out", "P"], "P"),
    (sr_train, "--cache", [*TRAIN, "--data", "hr", "--cache", "P", "--out", "o"], "P"),
    (sr_sample, "--out", ["--ckpt", "ckpt.pt", "--input", "lr", "--out", "P"], "P"),
    (sr_eval, "--report", ["--hr", "hr", "--sr", "sr", "--report", "P", *EVAL], "P"),
    (sr_eval, "--out", ["--hr", "hr", "--sr", "sr", "--out", "P/r.json", *EVAL],
     "P/r.json: its folder P"),
]  # fmt: skip


@pytest.mark.parametrize(
    "script, flag, argv, where",
    [pytest.param(*c, id=f"{c[0].__name__}{c[1]}") for c in UNDER_A_FILE],
)
def test_a_file_on_the_way_of_an_output_folder_is_named(world, capsys, script, flag, argv, where):
    """`--out file.png/run` said "cannot create it (Not a directory)" of the whole path: the part
    that is a file is named, in `describe_path`'s words, exit 7, before any output folder is made
    (sr_train.py's --cache: before its run folder too)."""
    with pytest.raises(SystemExit) as e:
        script.main([a.replace("P", "file.png/run") for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    said = f"file.png: {describe_path('file.png')}"
    where = where.replace("P", "file.png/run")
    assert err == [f"{script.__name__}.py: error: {flag} {where}: {said}"], err
    assert e.value.code == 7 and not Path("o").exists()


# Names that broke a message in two or hid a character: a newline (shlex.quote kept it raw in
# its quotes), \r, \t, ESC, a byte that is not UTF-8, a quote and a backslash, a space.
ODD_NAMES = ["a\nb", "cr\r.png", "tab\there", "esc\x1b[31mred", os.fsdecode(b"lat\xe9n\n"),
             "it's \\ σ\n", "line\u2028sep", "a b", "plain.png"]  # fmt: skip


def pasted(line: str) -> list[bytes]:
    """What bash makes of each $'...' word of a message line, pasted into it."""
    words = re.findall(r"\$'(?:[^'\\]|\\.)*'", line)
    assert words, line
    printf = ["bash", "-c", "printf '%s\\0' " + " ".join(words)]
    return subprocess.run(printf, capture_output=True, check=True, timeout=60).stdout.split(b"\0")[
        :-1
    ]


def test_shell_quote_is_one_printable_line_that_bash_reads_back():
    quoted = [shell_quote(n) for n in ODD_NAMES]
    assert all(q.isprintable() for q in quoted), quoted
    assert quoted[-2:] == ["'a b'", "plain.png"]  # (as shlex.quote where printable)
    assert quoted[0] == "$'a\\nb'" and quoted[3] == "$'esc\\x1b[31mred'"
    words = subprocess.run(["bash", "-c", "printf '%s\\0' " + " ".join(quoted)],
                           capture_output=True, check=True, timeout=60).stdout  # fmt: skip
    assert words.split(b"\0")[:-1] == [os.fsencode(n) for n in ODD_NAMES]


def one_line(err: str) -> str:
    """The one line of a message, checked to hold no character that is not printable."""
    assert err.endswith("\n") and err[:-1].isprintable(), err
    return err[:-1]


def test_a_name_with_a_newline_is_one_line_that_pastes_back(tmp_path, monkeypatch):
    """describe_path, link_to_nothing, links_said and near_path on real files and links whose
    names and targets hold a newline: each line one line, each $'...' in it the path itself."""
    monkeypatch.chdir(tmp_path)
    Path("hr").mkdir()
    Path("hr/gone\n1.png").symlink_to("moved\ndata/1.png")
    Path("loop\nlink").symlink_to("loop\nlink")
    Path("DIV2K\nHR").mkdir()
    Path("run\nfolder").mkdir()
    with pytest.warns(UserWarning) as said:
        with pytest.raises(DataError):  # (the link alone: no images)
            list_images("hr")
    warning = one_line(f"{said[0].message}\n")
    assert pasted(warning) == [b"gone\n1.png", b"moved\ndata/1.png"]
    cases = [
        (describe_path("hr/gone\n1.png", "file"), [b"hr/moved\ndata/1.png"]),
        (describe_path("loop\nlink", "file"), [b"loop\nlink"]),
        (describe_path("DIV2K\nHr"), [b"DIV2K\nHR"]),  # (did you mean ...?)
        (describe_path("run\nfolder", "file", example="last.pt"), [b"run\nfolder/last.pt"]),
    ]
    for line, paths in cases:
        assert pasted(one_line(line + "\n")) == paths, line


def test_the_scripts_quoted_paths_are_one_line(world, capsys):
    """sr_eval.py's --hr of a link to nothing, sr_sample.py's --input that is one: the name and
    the target in $'...', the line one line."""
    Path("hr2").mkdir()
    Path("hr2/gone\n1.png").symlink_to("moved\n1.png")
    with pytest.raises(SystemExit) as e:
        sr_eval.main(["--hr", "hr2", "--sr", "sr", *EVAL])
    line = one_line(capsys.readouterr().err)
    assert e.value.code == 3 and pasted(line) == [b"gone\n1.png", b"hr2/moved\n1.png"], line
    with pytest.raises(SystemExit) as e:
        sr_sample.main(["--ckpt", "ckpt.pt", "--input", "hr2/gone\n1.png", "--out", "o"])
    line = one_line(capsys.readouterr().err)
    assert e.value.code == 3 and pasted(line) == [b"hr2/gone\n1.png", b"hr2/moved\n1.png"], line


ODD = "d\n1\r2\t3\x1b[31mred"  # a newline, a carriage return, a tab and an ESC sequence
ODD_SHOWN = "d\\n1\\r2\\t3\\x1b[31mred"  # as every line shows it


def test_error_and_warning_lines_show_a_path_as_typed_printably(world, capsys):
    """A path at the start of a line, as typed (`DIR/b.png: not an image file`, `--hr DIR: no
    such folder`), is not quoted: its newline broke the error line in two (exit_on_error made it
    a space, and a \\r or ESC stayed raw), and a warning printed all raw. Now each line on stderr
    is one printable line, its control characters as escapes that name the path."""
    Path(ODD).mkdir()
    iio.imwrite(f"{ODD}/a.png", iio.imread("hr/a.png"))
    Path(f"{ODD}/b.png").write_bytes(b"not a png")  # (unreadable)
    Path("sr/000001_sample00000.png").symlink_to("000000_sample00000.png")  # (b's sample)
    runs = [
        (sr_train, [*TRAIN, "--data", ODD, "--out", "o"], f"{ODD_SHOWN}/b.png: not an image"),
        (sr_sample, ["--ckpt", "ckpt.pt", "--input", ODD, "--out", "o"],
         f"{ODD_SHOWN}/b.png: not an image"),
        (sr_eval, ["--hr", ODD, "--sr", "sr", *EVAL], f"{ODD_SHOWN}/b.png: not an image"),
        (sr_eval, ["--hr", f"{ODD}x", "--sr", "sr", *EVAL], f"--hr {ODD_SHOWN}x: no such folder"),
        (sr_train, [*TRAIN, "--data", "hr", "--resume", f"{ODD}.pt", "--out", "o"],
         f"--resume {ODD_SHOWN}.pt: no such file"),
    ]  # fmt: skip
    for script, argv, said in runs:
        with pytest.raises(SystemExit) as e:
            script.main(argv)
        err = capsys.readouterr().err
        assert e.value.code in (3, 6) and err.count("\n") == len(err.splitlines()), err
        assert all(line.isprintable() for line in err.split("\n")), err
        assert said in err, err
    # A warning: a folder's file of a format not read, said through each script's formatter
    Path(f"{ODD}/b.png").unlink()
    Path(f"{ODD}/c.gif").write_bytes(b"GIF89a")
    with pytest.warns(UserWarning) as caught:
        list_images(ODD)
    for prog in ("sr_train.py", "sr_sample.py"):  # (warnings.formatwarning)
        with exit_on_error(prog):
            line = warnings.formatwarning(caught[0].message, UserWarning, "x.py", 1)
        assert line.startswith(f"{prog}: warning: {ODD_SHOWN}: skipped 1 image"), line
        assert one_line(line).isprintable()
    assert sr_eval.main(["--hr", ODD, "--sr", "sr", *EVAL]) == 0  # (its own: one_line_warnings)
    warning = capsys.readouterr().err.splitlines()[0]
    assert warning.startswith(f"sr_eval.py: warning: {ODD_SHOWN}: skipped 1 image"), warning
    assert warning.isprintable()


def test_stdout_lines_show_an_output_folder_as_typed_printably(world, capsys):
    """The lines on stdout (progress, `done: ... -> OUT`) name --out as typed: its newline split
    the closing line in two, an ESC sequence reached the terminal."""
    assert sr_sample.main(["--ckpt", "ckpt.pt", "--input", "lr", "--out", ODD, "--n", "1"]) == 0
    out = capsys.readouterr().out
    assert all(line.isprintable() for line in out.split("\n")), out
    assert out.splitlines()[-1].endswith(f" -> {ODD_SHOWN}"), out
    assert Path(ODD, "a.png").is_file()  # (the folder itself as given)
    Path("hr3").mkdir()  # sr_eval.py's progress line names each image by its stem
    Path("hr/a.png").rename(f"hr3/{ODD}.png")
    assert sr_eval.main(["--hr", "hr3", "--sr", "sr", *EVAL]) == 0
    out = capsys.readouterr().out
    assert all(line.isprintable() for line in out.split("\n")), out
    assert f"[1/1] {ODD_SHOWN} sr: " in out, out


def test_sr_eval_table_names_a_method_as_typed(world, capsys):
    """A method (its --sr folder's name) with [b] in it lost it as rich markup (bold), and the
    borders after it their place; a newline or ESC was drawn raw inside the table."""
    Path("sr").rename("m[b]\x1b[2J\nx")
    assert sr_eval.main(["--hr", "hr", "--sr", "m[b]\x1b[2J\nx", *EVAL]) == 0
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line[:1] in "┏┃┡│└"]
    assert any(line.startswith("│ m[b]\\x1b[2J\\nx │") for line in table), table
    assert all(line.isprintable() for line in out.split("\n")), out
    assert len({len(line) for line in table}) == 1, table  # the borders line up


def test_a_terminal_line_over_the_bar_is_one_line_not_markup():
    """On a terminal sr_sample.py's line over its bar (an image's CUDA out-of-memory retry) and
    sr_train.py's (validation, rollback: OUT/last.pt) went through rich's console.print: an
    image a[b].png lost its [b] as markup (bold), an ESC or a newline in a name was written raw."""
    text = f"a[b]{ODD}: CUDA out of memory; retrying with --tile 64"
    log = sr_sample.ProgressLog(1)
    train = sr_train.Progress(1, 0, {})
    for progress, say in ((log, log.say), (train, train.message)):
        buf = io.StringIO()
        progress.tty = True
        progress.bar = Progress(console=Console(file=buf, force_terminal=True, width=200))
        say(text)
        line = re.sub(r"\x1b\[[0-9;]*m", "", buf.getvalue())  # (rich's own colours)
        assert line == f"a[b]{ODD_SHOWN}: CUDA out of memory; retrying with --tile 64\n", line


def test_one_line_escapes_what_is_not_printable_and_keeps_the_rest():
    assert errors.one_line("plain $'a\\nb' σ") == "plain $'a\\nb' σ"  # (quoted path, backslashes)
    assert errors.one_line("a\nb\rc\td\x1b[0m\x7f\u2028") == "a\\nb\\rc\\td\\x1b[0m\\x7f\\u2028"
    assert errors.one_line("caf\udce9") == "caf\\xe9"  # (a byte that is not UTF-8: bash's)


def test_a_library_error_of_several_lines_is_one_line_of_its_lines(capsys):
    """A library's message of several lines (torch's load_state_dict: a header line, then one
    tab-indented line per fault) quoted in an error line showed its line breaks as \\n and \\t:
    its lines are joined now, while a newline in a path of the same line stays an escape."""
    try:
        torch.nn.Linear(2, 2).load_state_dict({})
    except RuntimeError as error:
        library = error
    assert "\n\t" in str(library)  # (torch's own text, several lines)
    with pytest.raises(SystemExit) as e:
        with exit_on_error("p.py"):
            try:
                raise library
            except RuntimeError as error:  # as the scripts quote one: its context kept
                raise CheckpointError(f"w\n.pt: {error}; copy it again") from None
    assert e.value.code == 6
    err = one_line(capsys.readouterr().err)
    assert err.startswith(
        "p.py: error: w\\n.pt: Error(s) in loading state_dict for Linear: "
        'Missing key(s) in state_dict: "weight", "bias".; copy it again'
    ), err
    assert "\\t" not in err and err.count("\\n") == 1, err


def test_a_cuda_graph_warning_quoting_torch_is_one_line(capsys, monkeypatch):
    """The warning of a step that could not be recorded as a CUDA graph quotes torch's error: it
    was printed raw (an ESC sequence, a \\r reached the terminal)."""

    def capture(body, device):
        raise RuntimeError("operation not permitted\x1b[2J\x07 when stream is capturing\nmore")

    monkeypatch.setattr(sr_train, "capture", capture)
    model = torch.nn.Linear(2, 2)
    graph = sr_train.StepGraph(model, torch.device("cpu"))
    graph.out, graph.ok = {}, torch.ones(())
    assert graph.record(None, torch.zeros(1), torch.zeros(1), {}) is False
    err = one_line(capsys.readouterr().err)
    assert err == (
        "sr_train.py: warning: --cuda-graphs: Linear's training step could not be "
        "recorded as a CUDA graph (operation not permitted\\x1b[2J\\x07 when stream is "
        "capturing; more); it goes on without recording"
    ), err
