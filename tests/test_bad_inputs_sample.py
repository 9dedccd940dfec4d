"""Everyday mistakes with sr_sample.py: each gives one stderr line naming the flag or file, the
documented exit code (README, "Exit codes"), no traceback, and nothing written to --out."""

import json
import shutil
import sys
import warnings
import zipfile
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from conftest import TINY

import sr_sample
from sr_lib import __version__
from sr_lib.checkpoint import save_checkpoint
from sr_lib.errors import DataError
from sr_lib.models import build_model


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """Checkpoints, input folders and files that the cases below point at."""
    d = tmp_path_factory.mktemp("world")
    rng = np.random.default_rng(0)
    inp = d / "in"
    inp.mkdir()
    for stem in ("a", "b"):
        iio.imwrite(inp / f"{stem}.png", (rng.random((12, 12, 3)) * 255).astype(np.uint8))
    ckpts = {}
    for name in ("bicubic", "edsr", "srflow"):
        torch.manual_seed(0)
        cfg = {**TINY[name], "scale": 4}
        model = build_model(name, cfg)
        ckpts[name] = d / f"{name}.pt"
        save_checkpoint(ckpts[name], {"model": name, "model_cfg": cfg,
                                      "state_dict": model.state_dict(), "step": 0})  # fmt: skip
    (d / "empty").mkdir()
    (d / "twins").mkdir()
    for ext in ("png", "jpg"):
        iio.imwrite(d / "twins" / f"x.{ext}", (rng.random((12, 12, 3)) * 255).astype(np.uint8))
    (d / "text.png").write_text("not an image")
    iio.imwrite(d / "tiny.png", np.zeros((4, 4, 3), np.uint8))
    data = ckpts["bicubic"].read_bytes()
    (d / "truncated.pt").write_bytes(data[: len(data) // 2])
    (d / "notes.pt").write_text("hello\n")
    torch.save(build_model("edsr", {**TINY["edsr"], "scale": 4}).state_dict(), d / "raw.pth")
    wrapped = {"params": torch.load(d / "raw.pth", weights_only=True)}  # BasicSR's wrapping
    torch.save(wrapped, d / "basicsr.pth")
    # checkpoints of a newer srspace: a config field, a model this one does not know
    cfg = {**TINY["edsr"], "scale": 4, "from_the_future": 1}
    save_checkpoint(d / "newer.pt", {"model": "edsr", "model_cfg": cfg, "state_dict": {},
                                     "step": 0})  # fmt: skip
    save_checkpoint(d / "new model.pt", {"model": "esrgan", "model_cfg": {"scale": 4},
                                         "state_dict": {}, "step": 0})  # fmt: skip
    (d / "a_file").write_text("x")
    np.save(d / "bad.npy", np.zeros((3, 5), np.float32))
    (d / "junk.npy").write_text("junk")
    for name, settings in (("other", {"seed": 5}), ("broken", None)):
        (d / name).mkdir()
        text = "{" if settings is None else json.dumps(settings)
        (d / name / "manifest.json").write_text(text)
    (d / "moved").mkdir()
    (d / "moved" / "a b.png").symlink_to(d / "gone away" / "a b.png")
    (d / "foreign").mkdir()
    iio.imwrite(d / "foreign" / "a_sample00000.png", np.zeros((4, 4, 3), np.uint8))
    return {"dir": d, "in": inp, **ckpts}


def args(w, *extra, ckpt="bicubic", inp=None, out="out"):
    ckpt = w[ckpt] if ckpt in w else w["dir"] / ckpt
    inp = w["in"] if inp is None else w["dir"] / inp
    return ["--ckpt", ckpt, "--input", inp, "--out", w["dir"] / out, *extra]


CASES = {  # id: (argv of the world, exit code, words the one line must hold)
    "n zero": (lambda w: args(w, "--n", "0"), 2, "--n 0: must be an integer in 1..100000"),
    "n not a number": (lambda w: args(w, "--n", "ten"), 2, "--n ten: must be an integer"),
    "n above 5 digits": (lambda w: args(w, "--n", "100001"), 2, "1..100000"),
    "batch zero": (lambda w: args(w, "--batch", "0"), 2, "--batch"),
    "temperature inf": (lambda w: args(w, "--temperature", "inf"), 2, "--temperature inf: must"),
    "temperature nan": (lambda w: args(w, "--temperature", "nan"), 2, "--temperature nan: must be"),
    "temperature negative": (lambda w: args(w, "--temperature=-1"), 2, "--temperature -1: must be"),
    "temperature negative, spaced": (
        lambda w: args(w, "--temperature", "0.5", "-1"), 2, "--temperature -1: must be"),
    "temperature twice": (lambda w: args(w, "--temperature", "0.9", "0.90"), 2, "given twice"),
    "tile 1": (lambda w: args(w, "--tile", "1"), 2, "--tile 1: must be 0 or an integer >= 16"),
    "tile negative": (lambda w: args(w, "--tile=-64"), 2, "--tile"),
    "overlap = tile": (lambda w: args(w, "--tile", "32", "--tile-overlap", "32"), 2, "smaller"),
    "overlap negative": (lambda w: args(w, "--tile-overlap=-1"), 2, "--tile-overlap"),
    "seed negative": (lambda w: args(w, "--seed=-1"), 2, "--seed"),
    "layout unknown": (lambda w: args(w, "--layout", "flat"), 2, "--layout"),
    "shard out of range": (lambda w: args(w, "--shard", "2/2"), 2, "0 <= I < N"),
    "shard malformed": (lambda w: args(w, "--shard", "1-2"), 2, "--shard"),
    "shard auto outside SLURM": (lambda w: args(w, "--shard", "auto"), 2, "SLURM_ARRAY_TASK_ID"),
    "amp fp8": (lambda w: args(w, "--amp", "fp8"), 2, "--amp fp8: choose one of"),
    "amp fp16 on a flow": (
        lambda w: args(w, "--amp", "fp16", ckpt="srflow"),
        2,
        "--amp fp16: the srflow model's sampling leaves float16's range",
    ),
    "scale 5": (lambda w: args(w, "--scale", "5"), 2, "--scale 5: choose one of 2, 3, 4, 8"),
    "scale 0": (lambda w: args(w, "--scale", "0"), 2, "--scale 0: choose one of 2,"),
    "model unknown": (lambda w: args(w, "--model", "esrgan"), 2,
                      "--model esrgan: choose one of bicubic,"),
    "missing --ckpt": (lambda w: ["--input", w["in"], "--out", w["dir"] / "out"], 2, "--ckpt"),
    "unknown flag": (lambda w: args(w, "--samples", "3"), 2, "--samples"),
    "latent steps not numbers": (lambda w: args(w, "--latent-steps", "a,b"), 2, "--latent-steps"),
    "temperature 0 and -0": (lambda w: args(w, "--temperature", "0", "-0"), 2,
                             "--temperature: 0 is given twice"),
    "sweep on a deterministic model": (
        lambda w: args(w, "--temperature", "0.5", "1", ckpt="edsr"), 2, "deterministic"),
    "control the model lacks": (lambda w: args(w, "--ref", "lr", ckpt="srflow"), 2, "--ref"),
    "device without CUDA": (lambda w: args(w, "--device", "cuda"), 2, "--device cuda"),
    "input missing": (lambda w: args(w, inp="nowhere"), 3, "no such file or folder"),
    # a typo of a folder beside it, or of demo: the near path named, as sr_train.py --data does
    "input typo": (lambda w: args(w, inp="emptyy"), 3,
                   "emptyy: no such file or folder (did you mean "),
    "input demo typo": (lambda w: ["--ckpt", w["bicubic"], "--input", "demoo", "--out",
                                   w["dir"] / "out"], 3,
                        "--input demoo: no such file or folder (did you mean demo?)"),
    "input a link to a missing file": (
        lambda w: args(w, inp="moved/a b.png"), 3,
        "/moved/a b.png': a symbolic link to '"),
    "input empty folder": (lambda w: args(w, inp="empty"), 3, "no images found"),
    "input stems shared": (lambda w: args(w, inp="twins"), 3, "share the stem 'x'"),
    "input not an image": (lambda w: args(w, inp="text.png"), 3, "text.png"),
    "from-hr image too small": (lambda w: args(w, "--from-hr", "--scale", "4", inp="tiny.png"), 3,
                                "smaller than 8 px"),
    "latent not an array": (lambda w: args(w, "--latent", w["dir"] / "junk.npy", ckpt="srflow"), 3,
                            "junk.npy: not a readable .npz archive"),
    "checkpoint missing": (lambda w: args(w, ckpt="none.pt"), 6, "none.pt"),
    "checkpoint truncated": (lambda w: args(w, ckpt="truncated.pt"), 6, "truncated"),
    "checkpoint a text file": (lambda w: args(w, ckpt="notes.pt"), 6, "notes.pt"),
    "checkpoint a folder": (lambda w: args(w, ckpt="empty"), 6, "empty"),
    "checkpoint of a newer config": (lambda w: args(w, ckpt="newer.pt"), 6,
                                     "newer.pt: its edsr config has fields this srspace does not "
                                     "know ['from_the_future'] (written by srspace"),
    "checkpoint of a newer model": (lambda w: args(w, ckpt="new model.pt"), 6,
                                    "new model.pt: holds a model 'esrgan' this srspace does not"),
    "raw state_dict without --model": (lambda w: args(w, ckpt="raw.pth"), 6, "--model and --scale"),
    "raw state_dict of a non-default config": (  # torch.save(model.state_dict()) of a tiny EDSR
        lambda w: args(w, "--model", "edsr", "--scale", "4", ckpt="raw.pth"), 6,
        "load a model trained by sr_train.py from its checkpoint (OUT/last.pt or best.pt)"),
    "state_dict wrapped in a dict": (lambda w: args(w, "--model", "edsr", "--scale", "4",
                                                    ckpt="basicsr.pth"), 6,
                                     "under ['params']: save one of them alone, torch.save("),
    "raw state_dict of another model": (
        lambda w: args(w, "--model", "rrdb", "--scale", "4", ckpt="raw.pth"), 6, "raw.pth"),
    "out -": (lambda w: args(w)[:-1] + ["-"], 2, "--out -: standard input or output cannot be"),
    "input -": (lambda w: ["--ckpt", w["bicubic"], "--input", "-", "--out", w["dir"] / "out"], 2,
                "--input -: standard input or output"),
    "ref -": (lambda w: args(w, "--ref", "-"), 2, "--ref -: standard input or output"),
    # an unset shell variable, `--out "$OUT"`: its "" was the current folder (sampled into, its
    # images read), the default of the others (noise references, no latent, no degradation)
    **{f"{flag} empty {kind}": (lambda w, flag=flag: args(w, "--from-hr", flag, ""), 2,
                                f"{flag}: an empty {kind}; give {what}")
       for flag, kind, what in (
           ("--ckpt", "path", "a checkpoint written by sr_train.py"),
           ("--input", "path", "an image, a folder of images or demo"),
           ("--out", "path", "the folder to write the samples to"),
           ("--ref", "value", "a reference image or folder, noise, lr or prior, or leave"),
           ("--latent", "path", "a saved latent file or a --save-latent folder, or leave"),
           ("--latent-from", "path", "an HR image, or leave --latent-from out"),
           ("--latent-shift", "path", "a latent direction file, or leave --latent-shift out"),
           ("--device", "value", "auto, cpu, cuda or cuda:N, or leave --device out"),
           ("--lr-blur", "value", "a sigma or LO:HI (0 or none for no blur)"),
           ("--lr-noise", "value", "a sigma or LO:HI (0 or none for no noise)"),
           ("--lr-jpeg", "value", "a quality 1..100 or LO:HI (none for no JPEG)"),
       )},
    "out empty with check-invertibility": (  # (--out unused there, but typed "": refused too)
        lambda w: args(w, "--check-invertibility", "--out", "", ckpt="srflow"), 2,
        "--out: an empty path"),
    "out is a file": (lambda w: args(w, out="a_file"), 7, "a_file: a file, not a folder"),
    "out of other settings": (lambda w: args(w, out="other"), 2, "made with"),
    "out manifest broken": (lambda w: args(w, out="broken"), 2, "not a readable manifest"),
    "out of another tool": (lambda w: args(w, out="foreign"), 2, "no manifest.json"),
}  # fmt: skip


PER_IMAGE = ("input not an image", "from-hr image too small")


@pytest.mark.parametrize("case", CASES)
def test_bad_input(world, case, capsys):
    make, code, words = CASES[case]
    before = sorted(world["dir"].rglob("*"))
    try:
        got = sr_sample.main([str(a) for a in make(world)])
    except SystemExit as e:
        got = e.code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert got == code and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("sr_sample.py: error: ") and words in lines[0], lines[0]
    out = world["dir"] / "out"
    if case in PER_IMAGE:  # found while sampling: the folder was made, no image file written
        assert not list(out.glob("*.png"))
        shutil.rmtree(out)
    assert sorted(world["dir"].rglob("*")) == before  # nothing written


def test_help_marks_required_flags_and_cites_only_the_repository(capsys):
    with pytest.raises(SystemExit) as e:
        sr_sample.main(["-h"])
    text = capsys.readouterr().out
    assert e.value.code == 0
    usage = " ".join(text.split("options:")[0].split())
    assert "--ckpt CKPT --input INPUT --out OUT" in usage and "[--ckpt" not in usage
    assert "shared/" not in text and "spec" not in text and "../" not in text


def test_help_shows_no_internal_values_and_the_defaults(capsys):
    """-h as a user reads it: choices a user may pass, the defaults a flag takes unset."""
    with pytest.raises(SystemExit):
        sr_sample.main(["-h"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--scale {2,3,4,8}" in text and "{0," not in text
    assert "--model MODEL model of a raw state_dict (no metadata): bicubic, edsr," in text
    assert "--shard SHARD I/N: images I, I+N, ... only; auto: SLURM array (default: 0/1)" in text
    assert "one output each (default: -2,-1,0,1,2)" in text and "(default: auto)" in text


@pytest.mark.parametrize(
    "flags, said",
    [
        (["--temperature", "0.5"], "--temperature: no effect, the edsr model is deterministic"),
        (
            ["--raw-weights"],
            "--raw-weights: no effect, {ckpt} keeps no moving average of its weights",
        ),
        (["--latent-steps", "-1,1"], "--latent-steps: no effect without --latent-shift"),
        # typed at its default value: typed all the same
        (["--latent-steps", "-2,-1,0,1,2"], "--latent-steps: no effect without --latent-shift"),
        (["--seed", "0"], "--seed: no effect, the edsr model is deterministic"),
        (["--batch", "4"], "--batch: no effect, the edsr model is deterministic"),
        (["--from-hr", "--input", "demo"], "--from-hr: no effect, --input demo is HR already"),
    ],
)
def test_a_flag_without_effect_is_a_warning(world, flags, said, tmp_path, capsys):
    """The warning where the flag is typed; none where it is not (the same run otherwise)."""
    base = [str(a) for a in args(world, "--n", "1", ckpt="edsr")]
    if "--input" in flags:  # (the flag that makes the other one useless, kept in both runs)
        base[base.index("--input") + 1] = flags[flags.index("--input") + 1]
        flags = flags[: flags.index("--input")]
    for k, extra in enumerate((flags, [])):
        base[base.index("--out") + 1] = str(tmp_path / f"out{k}")
        assert sr_sample.main([*base, *extra]) == 0
        warned = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
        expected = [f"sr_sample.py: warning: {said.format(ckpt=world['edsr'])}; ignored"]
        assert warned == (expected if extra else []), extra


def test_a_checkpoint_another_torch_wrote_and_this_one_cannot_read(world, tmp_path, monkeypatch,
                                                                  capsys):  # fmt: skip
    """A checkpoint made on a laptop with the newest torch, sampled on a cluster with the oldest
    supported: where that torch cannot read it (a newer zip format, a type it lacks), the line
    said 'not a valid torch file or is truncated ... copy it again' or 'pickled Python objects
    that could run code'. Checkpoints record the torch that wrote them, and the line names the
    file and the versions that wrote it (made here by storing another torch's version)."""
    cfg = {**TINY["edsr"], "scale": 4}
    plain = {"model": "edsr", "model_cfg": cfg, "step": 0, "state_dict": {}}
    typed = {**plain, "x": torch.nn.Identity()}  # a torch type the reading torch lacks

    def sample(ckpt) -> str:
        argv = ["--ckpt", ckpt, "--input", world["in"], "--out", tmp_path / "out", "--n", "1"]
        with pytest.raises(SystemExit) as e:
            sr_sample.main([str(a) for a in argv])
        err = capsys.readouterr().err
        assert e.value.code == 6 and err.count("\n") == 1, err
        assert err.startswith(f"sr_sample.py: error: {ckpt}: "), err
        return err

    with monkeypatch.context() as m:
        m.setattr(torch, "__version__", "9.1.0")
        save_checkpoint(tmp_path / "new.pt", plain)
        save_checkpoint(tmp_path / "type.pt", typed)
    with zipfile.ZipFile(tmp_path / "new.pt") as z, zipfile.ZipFile(tmp_path / "fmt.pt", "w") as o:
        for item in z.infolist():  # the zip format version of a future torch
            o.writestr(item, b"99\n" if item.filename.endswith("/version") else z.read(item))
    by, this = f"written by srspace {__version__}, torch 9.1.0", f"this torch ({torch.__version__})"
    assert f"{by}, in a file format {this} cannot read" in sample(tmp_path / "fmt.pt")
    err = sample(tmp_path / "type.pt")
    assert f"{by}: holds torch.nn.modules.linear.Identity, which {this} cannot read; " in err
    assert err.endswith("load it with that torch or a newer one\n")
    # written by this torch, the same type is what it is: pickled code
    save_checkpoint(tmp_path / "code.pt", typed)
    assert "pickled Python objects (torch.nn.modules" in sample(tmp_path / "code.pt")


def test_no_degradation_is_typed_none_or_0(world, tmp_path):
    """sr_sample.py's --lr-blur, --lr-noise and --lr-jpeg take none (and a blur's or noise's 0)
    for no degradation, as sr_train.py's, now that their typed "" is refused: the folder of a
    run without the flags."""
    base = ["--ckpt", world["bicubic"], "--input", world["in"], "--from-hr", "--n", 1]
    none = ["--lr-blur", "none", "--lr-noise", "0", "--lr-jpeg", "none"]
    assert sr_sample.main([str(a) for a in (*base, *none, "--out", tmp_path / "o")]) == 0
    flags = json.loads((tmp_path / "o" / "manifest.json").read_text())["flags"]
    assert (flags["lr_blur"], flags["lr_noise"], flags["lr_jpeg"]) == ("", "", "")
    assert sr_sample.main([str(a) for a in (*base, "--out", tmp_path / "o")]) == 0  # the same


def unreadable_b(monkeypatch, text: dict):
    """sr_sample.read_input, with b.png unreadable: a DataError that quotes a library's
    error whose text is text["b"] (a decoder's, of several lines)."""
    real = sr_sample.read_input

    def read_input(path, *args):
        if path.stem == "b":
            try:
                raise OSError(text["b"])
            except OSError as e:
                raise DataError(f"{path}: not a readable image ({e})") from None
        return real(path, *args)

    monkeypatch.setattr(sr_sample, "read_input", read_input)


def test_a_skipped_input_shows_a_library_text_of_several_lines_by_the_rule(
    world, tmp_path, capsys, monkeypatch
):
    """An input that cannot be read, among others, is one line and skipped (`skip_input`). That
    line printed the error itself: a library's text of several lines that it quotes came out
    with \\n escapes, where exit_on_error's error line joins them (`joined_lines`). Now the
    same rule; under SRSPACE_FULL_ERRORS=1 a text cut to its first line follows it whole."""
    stack = [f"  frame #{i}: in libpng's png_read_row, reading a row of its IDAT chunk"
             for i in range(9)]  # fmt: skip
    whole = ["  its whole text (SRSPACE_FULL_ERRORS=1):", "    decoder error -2",
             *(f"    {line}" for line in stack)]  # fmt: skip
    cases = [  # the library's text, SRSPACE_FULL_ERRORS, what the line quotes, the lines after
        ("decoder error -2\n  in chunk IDAT", "", "decoder error -2; in chunk IDAT", []),
        ("decoder error -2\n  in chunk IDAT", "1", "decoder error -2; in chunk IDAT", []),
        ("\n".join(["decoder error -2", *stack]), "",
         "decoder error -2 (and 9 more lines: SRSPACE_FULL_ERRORS=1 shows them)", []),
        ("\n".join(["decoder error -2", *stack]), "1",
         "decoder error -2 (and 9 more lines: SRSPACE_FULL_ERRORS=1 shows them)", whole),
    ]  # fmt: skip
    text = {}
    unreadable_b(monkeypatch, text)
    b = world["in"] / "b.png"
    for k, (text["b"], env, shown, after) in enumerate(cases):
        monkeypatch.setenv("SRSPACE_FULL_ERRORS", env)
        argv = args(world, "--n", "1", "--quiet", out=str(tmp_path / f"o{k}"))
        with pytest.raises(SystemExit) as e:
            sr_sample.main([str(a) for a in argv])
        assert e.value.code == 3
        err = capsys.readouterr().err.splitlines()
        assert err[0] == f"sr_sample.py: error: {b}: not a readable image ({shown}); skipped", err
        assert err[1:-1] == after, err
        assert err[-1].startswith("sr_sample.py: error: 1 of 2 inputs unreadable (b.png)"), err


def test_a_library_warning_of_several_lines_in_a_run_is_one_line_its_lines_joined(
    world, tmp_path, capsys, monkeypatch
):
    """A library's warning of several lines raised inside a run (torch's, Pillow's) was one
    line with \\n escapes for its line breaks, as if a name's; now joined as in an error line
    (`joined_lines`), and under SRSPACE_FULL_ERRORS=1 one cut short follows whole. srspace's
    own warning keeps a name's newline escaped. (Both through the run's formatter.)"""
    library = torch.nn.functional.__file__
    stack = [f"  at frame {i} of the library's own code, which the user cannot act on"
             for i in range(6)]  # fmt: skip
    real = sr_sample.read_input

    def read_input(path, *args):
        warnings.warn_explicit("a library's warning:\n  of two lines", UserWarning, library, 1)
        warnings.warn_explicit("\n".join(["a long one", *stack]), UserWarning, library, 2)
        warnings.warn_explicit(f"{path.parent}/new\nname.png: srspace's own", UserWarning,
                               sr_sample.__file__, 1)  # fmt: skip
        return real(path, *args)

    def show(message, category, filename, lineno, file=None, line=None):
        """Python's own showwarning (which pytest's record of warnings replaces)."""
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    monkeypatch.setattr(sr_sample, "read_input", read_input)
    monkeypatch.setattr(warnings, "showwarning", show)
    monkeypatch.setenv("SRSPACE_FULL_ERRORS", "1")
    argv = args(world, "--n", "1", "--quiet", out=str(tmp_path / "o"))
    assert sr_sample.main([str(a) for a in argv]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "sr_sample.py: warning: a library's warning: of two lines",
        "sr_sample.py: warning: a long one (and 6 more lines: SRSPACE_FULL_ERRORS=1 shows them)",
        "  its whole text (SRSPACE_FULL_ERRORS=1):",
        "    a long one",
        *(f"    {line}" for line in stack),
        f"sr_sample.py: warning: {world['in']}/new\\nname.png: srspace's own",
    ], err
