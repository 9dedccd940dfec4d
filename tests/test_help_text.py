"""The -h texts a newcomer reads before the README: those that once left their meaning to it
(which validation images, what --cache holds, what --init-from takes, what "8x finer steps" or
"equal to the lpips module" meant). Nothing is run: the scripts print `-h` only."""

import pytest
from test_docs_facts import help_entries

import sr_eval
import sr_sample
import sr_train


def helps(main, capsys) -> dict[str, str]:
    """flag: its help text on one line (argparse's wrapping undone, "memory-\\nmapped" too)."""
    with pytest.raises(SystemExit) as e:
        main(["-h"])
    assert e.value.code == 0
    entries = help_entries(capsys.readouterr().out)
    return {f: " ".join(t.split()).replace("- ", "-") for f, t in entries.items()}


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
