"""Everyday mistakes with sr_eval.py: each gives its documented exit code and one stderr line
naming the flag or file, never a traceback, and writes no output file."""

import json
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch

import sr_eval
from sr_lib.data import link_to_nothing
from sr_lib.resize import imresize

SCALE = 4


def photo(h, w, seed):
    rng = np.random.default_rng(seed)
    return (
        np.kron(rng.random((h // 8 + 1, w // 8 + 1, 3)), np.ones((8, 8, 1)))[:h, :w] * 255
    ).astype(np.uint8)


@pytest.fixture
def world(tmp_path):
    """hr/ (two images), lr/ (x4), lr8/ (x8), sr/ (2 samples each, index layout), out/."""
    dirs = {d: tmp_path / d for d in ("hr", "lr", "lr8", "sr", "out")}
    for d in dirs.values():
        d.mkdir()
    for k, stem in enumerate(("a", "b")):
        hr = photo(48, 64, k)
        iio.imwrite(dirs["hr"] / f"{stem}.png", hr)
        iio.imwrite(dirs["lr"] / f"{stem}.png", imresize(hr, 1 / 4))
        iio.imwrite(dirs["lr8"] / f"{stem}.png", imresize(hr, 1 / 8))
        for i in range(2):
            noise = np.random.default_rng(10 * k + i).integers(-3, 4, hr.shape)
            sr = np.clip(hr.astype(int) + noise, 0, 255).astype(np.uint8)
            iio.imwrite(dirs["sr"] / f"{k:06d}_sample{i:05d}.png", sr)
    return tmp_path


def args(w: Path, *extra, hr="hr", sr="sr", n=2):
    sr = sr if "=" in sr else w / sr  # NAME=DIR values relative to the world (the cwd)
    base = ["--hr", w / hr, "--sr", sr, "--scale", SCALE, "--n", n, "--no-lpips"]
    return [str(a) for a in [*base, *extra]]


def index_file(w, content):
    (w / "sr" / "ntire_index.json").write_text(content)


def truncate(w):
    f = w / "sr" / "000001_sample00001.png"
    f.write_bytes(f.read_bytes()[:60])


def one_output_per_image(w):
    """out/ as sr_sample.py --n 1 writes it for a deterministic model: a.png, b.png."""
    (w / "out" / "manifest.json").write_text('{"n": 1, "scale": 4}')
    for k, stem in enumerate(("a", "b")):
        iio.imwrite(w / "out" / f"{stem}.png", photo(48, 64, k))


# (case id, setup(world) or None, argv(world), exit code, text the one line must contain)
CASES = [
    ("hr-missing", None, lambda w: args(w, hr="nope"), 3, "nope"),
    ("hr-empty", lambda w: (w / "empty").mkdir(), lambda w: args(w, hr="empty"), 3, "no images"),
    (
        "hr-is-a-file",
        None,
        lambda w: args(w, hr="hr/a.png"),
        3,
        "a.png: a file, not a folder; give a folder",
    ),
    (
        "hr-shared-stem",
        lambda w: iio.imwrite(w / "hr" / "a.jpg", photo(48, 64, 0)),
        lambda w: args(w),
        3,
        "'a'",
    ),
    ("sr-missing", None, lambda w: args(w, sr="nope"), 3, "nope"),
    ("sr-is-a-file", None, lambda w: args(w, sr="hr/a.png"), 3, "not a folder"),
    ("sr-no-layout", None, lambda w: args(w, sr="lr"), 3, "000000_sample00000.png"),
    (
        "sr-sample-missing",
        lambda w: (w / "sr" / "000001_sample00001.png").unlink(),
        lambda w: args(w),
        3,
        "000001_sample00001.png",
    ),
    ("n-too-large", None, lambda w: args(w, n=3), 3, "000000_sample00002.png"),
    ("sr-truncated-png", truncate, lambda w: args(w), 3, "000001_sample00001.png"),
    (
        "sr-not-an-image",
        lambda w: (w / "sr" / "000000_sample00001.png").write_text("hello"),
        lambda w: args(w),
        3,
        "000000_sample00001.png",
    ),
    (
        "sr-smaller-than-hr",
        lambda w: iio.imwrite(w / "sr" / "000000_sample00000.png", photo(40, 64, 0)),
        lambda w: args(w),
        3,
        "smaller",
    ),
    ("hr-is-the-lr-folder", None, lambda w: args(w, hr="lr"), 3, "larger than its ground truth"),
    ("lr-of-another-scale", None, lambda w: args(w, "--lr", w / "lr8"), 3, "(this LR is x8 of it)"),
    (
        "lr-a-row-short",  # the ratio of the dimension that is off, not only the width's
        lambda w: iio.imwrite(w / "lr" / "a.png", iio.imread(w / "lr" / "a.png")[:-1]),
        lambda w: args(w, "--lr", w / "lr"),
        3,
        "(64x48) at --scale 4 needs about 16x12 (this LR is x4 of it in width, x4.36 in height)",
    ),
    ("lr-missing-folder", None, lambda w: args(w, "--lr", w / "nope"), 3, "--lr"),
    (
        "lr-missing-image",
        lambda w: (w / "lr" / "b.png").unlink(),
        lambda w: args(w, "--lr", w / "lr"),
        3,
        "b.png",
    ),
    (
        "index-mismatch",
        lambda w: index_file(w, json.dumps({"scale": 4, "000000": "b", "000001": "a"})),
        lambda w: args(w),
        3,
        "index 000000",
    ),
    (
        "index-unreadable",
        lambda w: index_file(w, "{not json"),
        lambda w: args(w),
        3,
        "ntire_index.json",
    ),
    (
        "index-other-scale",
        lambda w: index_file(w, json.dumps({"scale": 8, "000000": "a", "000001": "b"})),
        lambda w: args(w),
        3,
        "x8",
    ),
    (
        "index-other-count",
        lambda w: index_file(
            w, json.dumps({"scale": 4, "000000": "a", "000001": "b", "000002": "c"})
        ),
        lambda w: args(w),
        3,
        "3 inputs",
    ),
    ("uncertainty-missing", None, lambda w: args(w, "--uncertainty", w / "sr"), 3, "_sigma.npy"),
    ("n-zero", None, lambda w: args(w, n=0), 2, "--n"),
    (
        "scale-5",
        None,
        lambda w: [*args(w)[:4], "--scale", "5", "--n", "2", "--no-lpips"],
        2,
        "--scale",
    ),
    ("sr-count-zero", None, lambda w: args(w, sr="sr:0"), 2, "at least 1"),
    ("sr-empty-name", None, lambda w: args(w, sr="=sr"), 2, "NAME=DIR"),
    ("sr-same-name-twice", None, lambda w: args(w, "--sr", "x=sr", sr="x=sr"), 2, "'x'"),
    (
        "no-lpips-and-weights",
        None,
        lambda w: args(w, "--lpips-weights", w / "x.pth"),
        2,
        "--no-lpips",
    ),
    ("ntire-with-lr", None, lambda w: args(w, "--ntire", "--lr", w / "lr"), 2, "--ntire"),
    ("shave-negative", None, lambda w: args(w, "--shave", "-1"), 2, "--shave"),
    ("shave-leaves-no-ssim", None, lambda w: args(w, "--shave", "20"), 3, "use --shave 18 or less"),
    ("lpips-batch-zero", None, lambda w: args(w, "--lpips-batch", "0"), 2, "--lpips-batch"),
    (
        "out-equals-csv",
        None,
        lambda w: args(w, "--out", w / "out" / "r.json", "--csv", w / "out" / "r.json"),
        2,
        "--csv",
    ),
    (
        "out-is-the-reports-index",
        None,
        lambda w: args(w, "--report", w / "R", "--out", w / "R" / "index.html"),
        2,
        "--out",
    ),
    (
        "csv-inside-the-report",
        None,
        lambda w: args(w, "--report", "R", "--csv", w / "R" / "plots" / "x.png"),
        2,
        "--report R",
    ),
    ("out-is-the-report", None, lambda w: args(w, "--report", w / "R", "--out", "R"), 2, "--out R"),
    (  # (with --no-lpips it runs nothing: a warning, test_an_lpips_flag_with_no_lpips_is_a_...)
        "device-cuda-absent",
        None,
        lambda w: [a for a in args(w) if a != "--no-lpips"] + ["--device", "cuda"],
        2,
        "--device",
    ),
    # a folder flag given a file or a dangling link said "no such folder", sending the user
    # looking for a typo in a path that is there
    (
        "lr-is-a-file",
        None,
        lambda w: args(w, "--lr", w / "lr" / "a.png"),
        3,
        "a.png: a file, not a folder",
    ),
    (
        "uncertainty-is-a-file",
        None,
        lambda w: args(w, "--uncertainty", w / "hr" / "a.png"),
        3,
        "a.png: a file, not a folder; give a folder",
    ),
    (
        "lr-is-a-link-to-a-missing-folder",
        lambda w: (w / "gone").symlink_to(w / "moved"),
        lambda w: args(w, "--lr", w / "gone"),
        3,
        "gone: a symbolic link to ",
    ),
    # a typo of a folder beside it, or of demo: the near path named, as sr_train.py --data does
    ("hr-typo", None, lambda w: args(w, hr="hrr"), 3, "hrr: no such folder (did you mean "),
    (
        "hr-demo-typo",
        None,
        lambda w: ["--hr", "demoo", *args(w)[2:]],
        3,
        "--hr demoo: no such folder (did you mean demo?)",
    ),
    ("sr-typo", None, lambda w: args(w, sr="srr"), 3, "srr: no such folder (did you mean "),
    ("lr-typo", None, lambda w: args(w, "--lr", w / "lrr"), 3, "lrr: no such folder (did you "),
    ("unknown-flag", None, lambda w: args(w, "--temprature", "1"), 2, "--temprature"),
    (
        "scale-not-a-number",
        None,
        lambda w: [*args(w)[:4], "--scale", "four", "--n", "2"],
        2,
        "four",
    ),
    ("color-unknown", None, lambda w: args(w, "--color", "lab"), 2, "--color"),
    ("n-missing", None, lambda w: args(w)[:6], 2, "--n"),
    ("out-is-a-folder", None, lambda w: args(w, "--out", "out"), 7, "e.g. out/out.json"),
    (
        "csv-is-a-folder",
        None,
        lambda w: args(w, "--csv", "out"),
        7,
        "--csv out: a folder, not a file; give a file, e.g. out/out.csv",
    ),
    (
        "out-below-a-file",
        None,
        lambda w: args(w, "--out", w / "hr" / "a.png" / "r.json"),
        7,
        "--out",
    ),
    (
        "one-output-per-image-at-n-2",  # a deterministic model's folder: the fix named, not N
        one_output_per_image,
        lambda w: args(w, sr="out"),
        3,
        "out: one output per image (a.png: sr_sample.py with a deterministic model and --n 1), "
        "not 2 samples; add :1 to its --sr value (--sr ",
    ),
    ("report-is-a-file", None, lambda w: args(w, "--report", w / "hr" / "a.png"), 7, "--report"),
    (  # (its line came after the LPIPS weights': offline, a mistyped --hr was exit 6)
        "hr-missing-and-lpips-weights-missing",
        None,
        lambda w: (
            [a for a in args(w, hr="nope") if a != "--no-lpips"]
            + ["--lpips-weights", str(w / "x.pth")]
        ),
        3,
        "nope: no such folder",
    ),
    (
        "lpips-weights-missing",
        None,
        lambda w: [a for a in args(w) if a != "--no-lpips"] + ["--lpips-weights", str(w / "x.pth")],
        6,
        "x.pth",
    ),
]


@pytest.mark.parametrize("case, setup, argv, code, text", CASES, ids=[c[0] for c in CASES])
def test_bad_input(world, capsys, monkeypatch, case, setup, argv, code, text):
    if case == "device-cuda-absent" and __import__("torch").cuda.is_available():
        pytest.skip("a GPU is present")
    if setup:
        setup(world)
    before = sorted(p for p in world.rglob("*"))
    monkeypatch.chdir(world)  # relative --sr NAME=DIR values
    with pytest.raises(SystemExit) as e:
        sr_eval.main(argv(world))
    out = capsys.readouterr()
    err = out.err.strip().splitlines()
    assert e.value.code == code, out.err
    assert len(err) == 1 and "Traceback" not in out.err, out.err
    assert err[0].startswith("sr_eval.py: error: ") and text in err[0], err[0]
    assert "[1/" not in out.out or code == 3  # output problems are found before any work
    assert sorted(p for p in world.rglob("*")) == before  # nothing written


@pytest.mark.parametrize(
    "device, said",
    [
        ("mps", "--device mps: srspace runs on cpu or cuda, not mps"),
        ("cuda:2", "--device cuda:2: this machine has 2 CUDA device(s), cuda:0 to cuda:1 (as "
         "CUDA_VISIBLE_DEVICES shows them); give one of them"),
        ("foo", "--device foo: "),
    ],
)  # fmt: skip
def test_a_device_lpips_cannot_run_on_is_one_line_before_the_weights(
    world, capsys, monkeypatch, device, said
):
    """--device of a type LPIPS cannot run on here (mps, xpu, meta) was a traceback once LPIPS
    was moved there, and cuda:2 on a machine of two GPUs an error of the first image; and every
    --device was checked after the LPIPS weights, so offline a mistyped one was exit 6 (the
    weights not found). Now one line, exit 2, before the weights are looked for."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # (two GPUs, in this test)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    argv = [a for a in args(world) if a != "--no-lpips"]
    argv += ["--lpips-weights", str(world / "missing.pth"), "--device", device]
    with pytest.raises(SystemExit) as e:
        sr_eval.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith(f"sr_eval.py: error: {said}")


def test_lpips_weights_given_a_folder_says_so_without_a_checkpoint_name(world, capsys):
    """--lpips-weights of a folder said to pass 'the file (last.pt)': a training checkpoint's
    name, which is no LPIPS state_dict."""
    argv = [a for a in args(world) if a != "--no-lpips"] + ["--lpips-weights", str(world / "hr")]
    with pytest.raises(SystemExit) as e:
        sr_eval.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 6 and len(err) == 1, err
    assert err[0].endswith(f"--lpips-weights {world / 'hr'}: a folder, not a file; give a file")


def test_at_least_twenty_cases():
    assert len({c[0] for c in CASES}) == len(CASES) >= 20


def test_a_link_to_a_missing_ground_truth_is_refused(world, capsys):
    """A dangling symlink in --hr was skipped with a warning, exit 0 (before that without a
    word): the means then leave out its image, compared with others' over the whole dataset.
    Refused before any work, one line naming the link and its target, exit 3."""
    (world / "hr" / "c.png").symlink_to(world / "moved" / "c.png")
    out = world / "r.json"
    with pytest.raises(SystemExit) as e:
        sr_eval.main(args(world, "--out", str(out)))
    assert e.value.code == 3
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"sr_eval.py: error: --hr {world / 'hr'}: c.png is {link_to_nothing(world / 'hr/c.png')}"
        ": the scores would leave out its image; restore the link's target or remove the link"
    ]
    assert not out.exists()
    (world / "hr" / "d.png").symlink_to(world / "moved" / "d.png")
    with pytest.raises(SystemExit) as e:
        sr_eval.main(args(world))
    err = capsys.readouterr().err
    assert e.value.code == 3
    assert "c.png is a symbolic link to " in err and " (and 1 more such link(s)): the" in err
    for stem in ("a", "b"):  # a folder of links alone (its dataset moved): "no images found",
        (world / "hr" / f"{stem}.png").unlink()  # its one warning held back, said no link
    with pytest.raises(SystemExit) as e:
        sr_eval.main(args(world))
    err = capsys.readouterr().err
    assert e.value.code == 3 and err.count("\n") == 1
    assert "c.png is a symbolic link to " in err and " (and 1 more such link(s)): the" in err


@pytest.mark.parametrize(
    "flags", [["--lpips-batch", "2"], ["--device", "cpu"], ["--device", "cuda:1"]]
)
def test_an_lpips_flag_with_no_lpips_is_a_warning(world, flags, capsys, monkeypatch):
    """LPIPS's flags where LPIPS is switched off: one warning line, and the run goes on; none
    where the flag is not typed. A --device of a GPU this machine lacks was refused (exit 2)
    though it runs nothing there: one script on nodes with and without GPUs failed on those
    without."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for extra in (flags, []):
        assert sr_eval.main(args(world, *extra)) == 0
        warned = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
        said = f"sr_eval.py: warning: {flags[0]}: no effect with --no-lpips; ignored"
        assert warned == ([said] if extra else []), extra


def test_a_library_warning_of_several_lines_is_one_line_its_lines_joined(capsys, monkeypatch):
    """sr_eval.py's warnings go through its own showwarning (`one_line_warnings`): a library's
    warning of several lines (torch's, Pillow's) was one line with \\n escapes for its line
    breaks, as if a name's; now joined as the other scripts' and the error lines show a
    library's text, and under SRSPACE_FULL_ERRORS=1 one cut short follows whole. srspace's own
    keeps a name's newline escaped."""
    show = sr_eval.one_line_warnings()
    library = torch.nn.functional.__file__
    stack = [f"  at frame {i} of the library's own code, which the user cannot act on"
             for i in range(6)]  # fmt: skip
    show(UserWarning("a library's warning\n  of two lines"), UserWarning, library, 1)
    show(UserWarning("new\nname.png: srspace's own"), UserWarning, sr_eval.__file__, 1)
    monkeypatch.setenv("SRSPACE_FULL_ERRORS", "1")
    show(UserWarning("\n".join(["a long one", *stack])), UserWarning, library, 2)
    assert capsys.readouterr().err.splitlines() == [
        "sr_eval.py: warning: a library's warning; of two lines",
        "sr_eval.py: warning: new\\nname.png: srspace's own",
        "sr_eval.py: warning: a long one (and 6 more lines: SRSPACE_FULL_ERRORS=1 shows them)",
        "  its whole text (SRSPACE_FULL_ERRORS=1):",
        "    a long one",
        *(f"    {line}" for line in stack),
    ]
