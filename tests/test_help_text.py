"""The -h texts a newcomer reads before the README: those that once left their meaning to it
(which validation images, what --cache holds, what --init-from takes, what "8x finer steps" or
"equal to the lpips module" meant). Nothing is run: the scripts print `-h` only."""

import re

import pytest
from test_docs_facts import help_entries

import sr_eval
import sr_sample
import sr_train
from sr_lib.models import MODELS


def helps(main, capsys) -> dict[str, str]:
    """flag: its help text on one line (argparse's wrapping undone)."""
    with pytest.raises(SystemExit) as e:
        main(["-h"])
    assert e.value.code == 0
    entries = help_entries(capsys.readouterr().out)
    return {f: " ".join(t.split()) for f, t in entries.items()}


def test_sr_train_help_says_which_validation_images_the_cache_and_init_from(capsys):
    h = helps(sr_train.main, capsys)
    assert "the first N images, in name order (0 = all)" in h["--val-images"]
    assert "(a deterministic model: 1)" in h["--val-n"]
    assert "memory-mapped .npy (else in RAM)" in h["--cache"]
    assert "checkpoint" in h["--init-from"] and "fresh optimizer" in h["--init-from"]


def test_sr_sample_help_says_what_fp16_trades(capsys):
    assert (
        "fp16: float16 (8x bf16's precision, far less range)"
        in helps(sr_sample.main, capsys)["--amp"]
    )


def test_sr_eval_help_says_what_the_cpu_lpips_batch_keeps(capsys):
    h = helps(sr_eval.main, capsys)["--lpips-batch"]
    assert "1 on CPU, where the numbers equal the lpips package's to the bit" in h


SCREENS = (
    [(sr_train, ["-h"])]
    + [(sr_train, ["--model", m, "-h"]) for m in MODELS]
    + [
        (sr_sample, ["-h"]),
        (sr_eval, ["-h"]),
    ]
)


def screen(script, argv, columns, capsys, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", str(columns))  # argparse's width (shutil.get_terminal_size)
    with pytest.raises(SystemExit) as e:
        script.main(argv)
    assert e.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize(
    "script, argv", SCREENS, ids=[f"{m.__name__} {' '.join(a)}" for m, a in SCREENS]
)
def test_help_never_breaks_a_flag_or_a_hyphenated_word(script, argv, capsys, monkeypatch):
    """argparse's textwrap broke lines after a hyphen: `sr_sample.py --save-` / `uncertainty`
    in sr_eval.py -h, `super-` / `resolved`. Each screen at the usual widths has the words of the
    screen wide enough to wrap nothing, every --flag among them whole on its line."""
    unwrapped = screen(script, argv, 100_000, capsys, monkeypatch).split()
    flags = {w for w in unwrapped if re.match(r"\[?--\w", w)}
    assert len(flags) >= 15, flags  # (the screen was read)
    for columns in (40, 60, 80, 200):
        words = screen(script, argv, columns, capsys, monkeypatch).split()
        broken = [f"{a} / {b}" for a, b in zip(words, words[1:]) if re.search(r"\w-$", a)]
        assert not broken, (columns, broken)
        assert words == unwrapped, columns


# How a help may speak of a default: the one form `(default: X)` (`show_defaults` adds it, or
# `; default: X` inside a parenthesis), a switch's "the default; undoes --no-X", and prose about
# another default (the lpips package's, what happens without a switch)
DEFAULT_SAID = r"\(default: |; default: |^the default; undoes |package's default|by default"


@pytest.mark.parametrize(
    "script, argv", SCREENS, ids=[f"{m.__name__} {' '.join(a)}" for m, a in SCREENS]
)
def test_help_shows_a_default_in_one_form(script, argv, capsys):
    """sr_sample.py -h wrote `(default 10)` for --n and --batch and `stem (default): ...` for its
    choices, where every other flag of the three scripts ends with `(default: X)`."""
    entries = helps(script.main, capsys)
    other = {f: t for f, t in entries.items() if "default" in re.sub(DEFAULT_SAID, "", t)}
    assert not other, other
    if script is sr_sample:
        for flag, default in (("--n", "10"), ("--batch", "10"), ("--layout", "stem"),
                              ("--bit-depth", "8"), ("--alpha-channel", "keep"),
                              ("--alpha-upsampler", "bicubic"), ("--ref", "noise")):  # fmt: skip
            assert entries[flag].endswith(f" (default: {default})"), entries[flag]
