"""--quiet (warnings, errors and the closing line only) and --json (the closing line as one JSON
object a pipeline parses) of the three scripts, on success, a SIGTERM stop and an error."""

import dataclasses
import json
import os
import signal
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch

import sr_eval
import sr_lib.metrics
import sr_sample
import sr_train
from sr_lib.config import asks_json
from sr_lib.data import WorkersHung
from sr_lib.errors import Resumable


@pytest.fixture
def hr_dir(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    folder = tmp_path / "hr"
    folder.mkdir()
    for i in range(2):  # 80x96, smooth 8x8 blocks
        img = np.kron(rng.random((10, 12, 3)), np.ones((8, 8, 1))) * 255
        iio.imwrite(folder / f"im{i}.png", img.astype(np.uint8))
    return folder


def train_argv(hr_dir: Path, out: Path, steps: int = 3) -> list[str]:
    return ["--model", "edsr", "--n-feats", "8", "--n-blocks", "1", "--scale", "4", "--data",
            str(hr_dir), "--patch", "8", "--batch", "2", "--steps", str(steps), "--workers", "0",
            "--log-every", "1", "--val-every", "0", "--out", str(out)]  # fmt: skip


def logged(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def last_json(text: str) -> dict:
    """The last line of stdout, which --json makes one JSON object."""
    return json.loads(text.splitlines()[-1])


def test_quiet_prints_the_closing_line_only_and_writes_the_same_files(hr_dir, tmp_path, capsys):
    run, loud = tmp_path / "run", tmp_path / "loud"
    assert sr_train.main(train_argv(hr_dir, loud)) == 0
    assert len(capsys.readouterr().out.splitlines()) > 3  # (the start, data, steps: the control)
    assert sr_train.main([*train_argv(hr_dir, run), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines() == [f"done: 3 steps, 0 skipped, checkpoint {run / 'last.pt'}"]
    assert [r["step"] for r in logged(run)] == [1, 2, 3]  # log.jsonl as usual

    samples = tmp_path / "samples"
    sample = ["--ckpt", str(run / "last.pt"), "--input", str(hr_dir), "--from-hr", "--n", "2",
              "--out", str(samples)]  # fmt: skip
    assert sr_sample.main([*sample, "--quiet"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("done: 2 images sampled, 0 already complete")
    assert sorted(p.name for p in samples.glob("*.png")) == [
        f"im{i}_sample{k:05d}.png" for i in range(2) for k in range(2)
    ]
    assert sr_sample.main(sample) == 0  # --quiet and --json are not settings of the folder
    assert len(capsys.readouterr().out.splitlines()) == 2  # a line per image run, and done

    results = tmp_path / "r.json"
    evaluate = ["--hr", str(hr_dir), "--sr", str(samples), "--scale", "4", "--n", "2",
                "--no-lpips"]  # fmt: skip
    assert sr_eval.main([*evaluate, "--out", str(results), "--quiet"]) == 0
    assert capsys.readouterr().out == ""  # the results are in --out's file
    assert json.loads(results.read_text())["mean"]["PSNR_mean"] > 0
    assert sr_eval.main([*evaluate, "--quiet"]) == 0  # the table is the only result: shown
    out = capsys.readouterr().out
    assert "PSNR_mean" in out and "[1/2]" not in out
    assert sr_eval.main(evaluate) == 0
    assert "[1/2] im0" in capsys.readouterr().out  # (without --quiet: a line per image)


def test_json_closing_line_of_each_script(hr_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert sr_train.main([*train_argv(hr_dir, run), "--json", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert len(out.splitlines()) == 1  # --quiet: the closing line alone
    line = last_json(out)
    assert line == {
        "script": "sr_train.py", "exit_code": 0, "error": None, "out": str(run), "step": 3,
        "steps": 3, "skipped": 0, "loss": logged(run)[-1]["loss"], "loss_step": 3,
        "checkpoint": str(run / "last.pt"), "checkpoint_step": 3, "stopped": None,
    }  # fmt: skip

    samples = tmp_path / "samples"
    sample = ["--ckpt", str(run / "last.pt"), "--input", str(hr_dir), "--from-hr", "--n", "2",
              "--out", str(samples), "--json"]  # fmt: skip
    for sampled, skipped in ((2, 0), (0, 2)):  # the rerun finds both images complete
        assert sr_sample.main(sample) == 0
        out = capsys.readouterr().out
        assert "done:" not in out  # the JSON line instead
        line = last_json(out)
        assert line.pop("seconds") >= 0
        assert line == {"script": "sr_sample.py", "exit_code": 0, "error": None,
                        "out": str(samples), "folders": [str(samples)], "images": 2,
                        "sampled": sampled, "skipped": skipped, "failed": 0,
                        "stopped": None}  # fmt: skip

    results = tmp_path / "r.json"
    evaluate = ["--hr", str(hr_dir), "--sr", f"mine={samples}", "--scale", "4", "--n", "2",
                "--no-lpips", "--json"]  # fmt: skip
    assert sr_eval.main([*evaluate, "--out", str(results)]) == 0
    out = capsys.readouterr().out
    assert "PSNR_mean" in out.splitlines()[0]  # the table first (no --quiet)
    line = last_json(out)
    assert line == {"script": "sr_eval.py", "exit_code": 0, "error": None,
                    "results": str(results), "csv": None, "report": None, "images": 2,
                    "scored": 2, "partial": None, "kept": 0,
                    "mean": {"mine": json.loads(results.read_text())["mean"]},
                    "stopped": None}  # fmt: skip
    assert line["mean"]["mine"]["LPIPS_mean"] is None  # (NaN: not computed) as results.json
    with pytest.raises(SystemExit) as e:  # stdout holds one of them
        sr_eval.main([*evaluate, "--out", "-"])
    assert e.value.code == 2 and capsys.readouterr().out == ""


def test_json_line_after_a_sigterm_stop_and_an_error(hr_dir, tmp_path, capsys, monkeypatch):
    """SIGTERM (SLURM) in training step 2: last.pt of step 2 and exit 75, and the line says so;
    an error (a missing --data folder, exit 3) is its error line on stderr and the JSON line."""
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)  # (no requeue)
    real_step = sr_train.train_step

    def sigterm_in_step_2(*args, **kwargs):
        if args[4] == 1:  # step index 1: the second step
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(sr_train, "train_step", sigterm_in_step_2)
    run = tmp_path / "run"
    assert sr_train.main([*train_argv(hr_dir, run, steps=100), "--json"]) == 75
    line = last_json(capsys.readouterr().out)
    assert line["exit_code"] == 75 and line["stopped"] == "SIGTERM" and line["error"] is None
    assert (line["step"], line["checkpoint"], line["checkpoint_step"]) == (
        2,
        str(run / "last.pt"),
        2,
    )
    monkeypatch.undo()

    with pytest.raises(SystemExit) as e:
        sr_train.main([*train_argv(tmp_path / "none", tmp_path / "r2"), "--json"])
    captured = capsys.readouterr()
    line = last_json(captured.out)
    assert e.value.code == 3 and line["exit_code"] == 3 and line["checkpoint"] is None
    assert captured.err.strip() == f"sr_train.py: error: {line['error']}"
    assert str(tmp_path / "none") in line["error"]

    samples = tmp_path / "samples"
    real_read = sr_sample.read_input
    calls = []

    def sigterm_at_the_second_image(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_read(*args, **kwargs)

    monkeypatch.setattr(sr_sample, "read_input", sigterm_at_the_second_image)
    with pytest.raises(SystemExit) as e:
        sr_sample.main(["--ckpt", str(run / "last.pt"), "--input", str(hr_dir), "--from-hr",
                        "--n", "2", "--out", str(samples), "--json"])  # fmt: skip
    captured = capsys.readouterr()
    line = last_json(captured.out)
    assert e.value.code == 75 and line["exit_code"] == 75 and "SIGTERM" in line["error"]
    assert (line["images"], line["sampled"], line["skipped"]) == (2, 1, 0)
    assert len(list(samples.glob("im0_sample*.png"))) == 2  # the one sampled is complete


def test_json_line_of_a_sigterm_before_the_first_step_names_it(hr_dir, tmp_path, capsys,
                                                                monkeypatch):  # fmt: skip
    """SIGTERM while the run starts (data decoded, model built): exit 75, nothing saved, and the
    JSON line's `stopped` is "SIGTERM", as after a stop in the loop (it was null: a pipeline
    that requeues on `stopped` took the run for one that had not stopped)."""
    real_setup = sr_train.setup_process

    def sigterm_at_setup(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_setup(*args, **kwargs)

    monkeypatch.setattr(sr_train, "setup_process", sigterm_at_setup)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)  # (no requeue)
    with pytest.raises(SystemExit) as e:
        sr_train.main([*train_argv(hr_dir, tmp_path / "run"), "--json", "--quiet"])
    captured = capsys.readouterr()
    line = json.loads(captured.out)  # stdout: the one line
    assert e.value.code == 75 and line["exit_code"] == 75 and line["stopped"] == "SIGTERM"
    assert (line["step"], line["checkpoint"]) == (0, None)
    assert captured.err.strip() == f"sr_train.py: error: {line['error']}"


BAD_COMMAND_LINES = [
    (sr_train, ["--model", "edsr", "--steps", "x"]),
    (sr_sample, ["--ckpt", "c.pt", "--input", "in", "--out", "o", "--n", "notanumber"]),
    (sr_eval, ["--hr", "hr", "--sr", "sr", "--scale", "4", "--n", "x"]),
]


@pytest.mark.parametrize("script, argv", BAD_COMMAND_LINES, ids=lambda x: getattr(x, "PROG", ""))
@pytest.mark.parametrize("flag", ["--json", "--js"])
def test_json_line_after_a_command_line_that_cannot_be_parsed(script, argv, flag, capsys):
    """`--json --n notanumber`: argparse's error came alone (exit 2), without the JSON line a
    pipeline parses stdout's last line for. Now the error line on stderr, then that line on
    stdout, also for --json abbreviated as argparse takes it, and for a required flag left out;
    without --json, stdout stays empty."""
    for args in ([flag, *argv], [*argv, flag], [flag]):
        with pytest.raises(SystemExit) as e:
            script.main(args)
        captured = capsys.readouterr()
        line = json.loads(captured.out)  # (the one line)
        assert (e.value.code, line["script"], line["exit_code"]) == (2, script.PROG, 2)
        assert captured.err == f"{script.PROG}: error: {line['error']}\n" and line.keys() == {
            "script",
            "exit_code",
            "error",
        }
    with pytest.raises(SystemExit) as e:
        script.main(argv)
    assert e.value.code == 2 and capsys.readouterr().out == ""


@pytest.mark.parametrize("script", [sr_train, sr_sample, sr_eval], ids=lambda s: s.PROG)
def test_help_with_json_is_the_help_alone(script, capsys):
    """-h with --json: the help, exit 0, and no JSON line (the help is for a person)."""
    with pytest.raises(SystemExit) as e:
        script.main(["--json", "-h"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith("usage:") and "--json" in out
    assert not any(line.startswith("{") for line in out.splitlines())


def test_asks_json_takes_the_abbreviations_argparse_takes():
    """argparse takes a start of a flag that no other flag starts with: `--j` is --json where no
    other flag starts so, ambiguous (an error, without --json) where one does."""

    @dataclasses.dataclass
    class Args:
        jitter: int = 0
        json: bool = False

    assert [asks_json(Args, [a], "x") for a in ("--json", "--jso", "--js", "--j", "--ji")] == [
        True, True, True, False, False
    ]  # fmt: skip
    assert not asks_json(Args, ["--", "--json"], "x") and asks_json(Args, ["--json=1"], "x")


def test_sample_json_line_has_every_field_after_an_early_error(tmp_path, capsys):
    """README's field list holds for every line: an error before the folders are claimed (a
    checkpoint that does not exist) left `folders` and `seconds` out of it; null now."""
    argv = ["--ckpt", str(tmp_path / "none.pt"), "--input", str(tmp_path), "--out",
            str(tmp_path / "samples"), "--json"]  # fmt: skip
    with pytest.raises(SystemExit) as e:
        sr_sample.main(argv)
    line = last_json(capsys.readouterr().out)
    assert e.value.code == line["exit_code"] != 0 and line["error"]
    assert line == {"script": "sr_sample.py", "exit_code": line["exit_code"],
                    "error": line["error"], "out": str(tmp_path / "samples"), "folders": None,
                    "images": None, "sampled": 0, "skipped": 0, "failed": 0,
                    "seconds": None, "stopped": None}  # fmt: skip


def test_a_save_declined_for_non_finite_weights_is_not_named_as_held(hr_dir, tmp_path, capsys,
                                                                        monkeypatch):  # fmt: skip
    """`save` declines a checkpoint of non-finite weights (a step whose loss was finite that
    left an inf in them), and the run recorded the step as saved all the same: the closing line
    said `done: 3 steps, ..., checkpoint OUT/last.pt` and --json `checkpoint_step` 3, last.pt
    holding step 2. Now the declined save is exit 5, its line naming what holds the run."""
    real_step = sr_train.train_step

    def inf_after_step_3(*args, **kwargs):
        done = real_step(*args, **kwargs)
        if args[4] == 2:  # step index 2: the third, the last
            with torch.no_grad():
                next(args[0].parameters()).fill_(float("inf"))
        return done

    monkeypatch.setattr(sr_train, "train_step", inf_after_step_3)
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        sr_train.main([*train_argv(hr_dir, run), "--save-every", "2", "--json"])
    captured = capsys.readouterr()
    line = last_json(captured.out)
    assert e.value.code == 5 and line["exit_code"] == 5 and line["step"] == 3
    assert (line["checkpoint"], line["checkpoint_step"]) == (str(run / "last.pt"), 2)
    assert line["error"] == (f"step 3: the parameters are not finite, {run / 'last.pt'} not "
                             f"written; {run / 'last.pt'} holds step 2")  # fmt: skip
    assert torch.load(run / "last.pt", weights_only=True)["step"] == 2


def test_a_declined_best_pt_is_not_recorded_as_the_best(hr_dir, tmp_path, monkeypatch):
    """A best.pt that `save` declines (its weights not finite: nothing written) was recorded as
    the best all the same: last.pt's best and best_step named the declined step (the strips
    kept by --keep-strips, best_step on resume), and a later validation better than best.pt's,
    but not than the declined score, wrote no best.pt. Now the best stays best.pt's."""
    scores = iter([1.0, 2.0, 1.5])  # steps 1, 2, 3
    monkeypatch.setattr(sr_train, "validate", lambda *args, **kwargs: next(scores))
    real_save = sr_train.save

    def decline_best_of_step_2(path, step, *args):
        if path.name == "best.pt" and step == 2:
            return False  # (as for non-finite weights: nothing written)
        return real_save(path, step, *args)

    monkeypatch.setattr(sr_train, "save", decline_best_of_step_2)
    run, val = tmp_path / "run", tmp_path / "val"
    val.mkdir()
    iio.imwrite(val / "v.png", np.full((32, 32, 3), 90, np.uint8))  # (not scored: `validate`)
    argv = [*train_argv(hr_dir, run), "--val-every", "1", "--val-data", str(val)]
    assert sr_train.main(argv) == 0
    last = torch.load(run / "last.pt", weights_only=True)
    assert torch.load(run / "best.pt", weights_only=True)["step"] == 3
    assert (last["best_step"], last["best"]) == (3, 1.5)


def stop_at_second_call(monkeypatch, module, name: str, signum: int) -> None:
    """module.name sending this process `signum` at its second call (the second image or step)."""
    real, calls = getattr(module, name), []

    def call(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signum)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, call)


def stopped_run(script, argv: list[str], capsys) -> tuple[int, dict, str]:
    """The exit code, the --json line and stderr of script.main(argv)."""
    try:
        code = script.main(argv)
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, last_json(captured.out), captured.err


@pytest.mark.parametrize(
    "signum, code", [(signal.SIGTERM, 75), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"]
)
def test_json_stopped_and_error_mean_the_same_in_every_script(
    hr_dir, tmp_path, capsys, monkeypatch, signum, code
):
    """`stopped` was sr_train.py's alone: a pipeline that requeues on it missed the stops of
    sr_sample.py and sr_eval.py. Every line has it now, the same values (the signal's name;
    null where the run was not stopped). `error` is the text of the error line on stderr, null
    where there is none: sr_train.py's stop in the loop is its closing line on stdout (error
    null), sr_sample.py's and sr_eval.py's stop an error line."""
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)  # (no requeue)
    run, samples = tmp_path / "run", tmp_path / "samples"
    assert sr_train.main(train_argv(hr_dir, run, steps=2)) == 0
    stop_at_second_call(monkeypatch, sr_train, "train_step", signum)
    sample = ["--ckpt", str(run / "last.pt"), "--input", str(hr_dir), "--from-hr", "--n", "2",
              "--out", str(samples), "--json"]  # fmt: skip
    runs = [(sr_train, [*train_argv(hr_dir, tmp_path / "stopped", steps=5), "--json"], 75)]
    runs += [(sr_sample, sample, code)]
    runs += [(sr_eval, ["--hr", str(hr_dir), "--sr", str(samples), "--scale", "4", "--n", "2",
                        "--no-lpips", "--json"], code)]  # fmt: skip
    capsys.readouterr()
    stop_at_second_call(monkeypatch, sr_sample, "read_input", signum)
    stop_at_second_call(monkeypatch, sr_lib.metrics, "evaluate_image", signum)
    for script, argv, exit_code in runs:  # (sr_train.py: a Ctrl-C in the loop saves, exit 75)
        got, line, err = stopped_run(script, argv, capsys)
        assert (got, line["exit_code"], line["stopped"]) == (exit_code, exit_code, signum.name)
        said = [e for e in err.splitlines() if e.startswith(f"{script.PROG}: ")]
        if script is sr_train:
            assert line["error"] is None and said == []
        else:
            assert said == [f"{script.PROG}: {'' if code == 130 else 'error: '}{line['error']}"]
        if script is sr_sample:  # the samples of the first image, for sr_eval.py's second
            assert sr_sample.main([*sample, "--quiet"]) == 0


BAD_VALUES = [
    (sr_train, ["--model", "edsr", "--steps", "x"], "--steps x: must be an integer"),
    (sr_train, ["--model", "edsr", "--on-nan", "retyr"],
     "--on-nan retyr: choose one of stop, rollback"),
    (sr_train, ["--model", "edsrr"], "--model edsrr: choose one of bicubic, edsr, rrdb, srflow, "
     "srflow_da, ncsr, vspsr, refvae, varsr (did you mean edsr?)"),
    (sr_sample, ["--ckpt", "c", "--input", "i", "--out", "o", "--n", "0"],
     "--n 0: must be an integer in 1..100000"),
    (sr_sample, ["--ckpt", "c", "--input", "i", "--out", "o", "--layout", "stm"],
     "--layout stm: choose one of stem, ntire (did you mean stem?)"),
    (sr_sample, ["--ckpt", "c", "--input", "i", "--out", "o", "--shard", "a b"],
     "--shard 'a b': give I/N with 0 <= I < N (e.g. 0/4), or auto"),
    (sr_eval, ["--hr", "h", "--sr", "s", "--scale", "4", "--n", "1.5"],
     "--n 1.5: must be an integer"),
    (sr_eval, ["--hr", "h", "--sr", "s", "--scale", "4", "--n", "1\n2"],
     "--n $'1\\n2': must be an integer"),  # (one line, as bash reads it back)
]  # fmt: skip


@pytest.mark.parametrize("script, argv, said", BAD_VALUES, ids=lambda x: getattr(x, "PROG", ""))
def test_a_bad_value_of_argparse_reads_as_the_scripts_own_errors(script, argv, said, capsys):
    """argparse's type and choice errors read `argument --n: '0': expected an integer in
    1..100000; see sr_sample.py -h` beside srspace's own `--steps -1: must be an integer >= 0`;
    in the house form now (docs/design.md "Errors"): the flag and the value as typed (quoted
    for a shell where it must be), then what it must be; --json's `error` the same words."""
    with pytest.raises(SystemExit) as e:
        script.main([*argv, "--json"])
    captured = capsys.readouterr()
    assert e.value.code == 2 and captured.err == f"{script.PROG}: error: {said}\n"
    assert json.loads(captured.out)["error"] == said


def test_json_images_is_the_inputs_once_listed_in_both_scripts(hr_dir, tmp_path, capsys):
    """`images` was null after an sr_sample.py error that came after its inputs were listed (a
    missing --ckpt: set only once the folders were claimed), where sr_eval.py's names the --hr
    images once listed (a missing --sr: 2). Both now: the inputs once listed, null before (a
    missing --input, --hr)."""
    none = str(tmp_path / "none")
    sample = ["--ckpt", none, "--input", str(hr_dir), "--out", str(tmp_path / "o"), "--json"]
    evaluate = ["--hr", str(hr_dir), "--sr", none, "--scale", "4", "--n", "1", "--no-lpips",
                "--json"]  # fmt: skip
    runs = [(sr_sample, sample, 2), (sr_sample, [*sample, "--shard", "1/2"], 1)]
    runs += [(sr_eval, evaluate, 2), (sr_sample, [*sample, "--input", none], None)]
    runs += [(sr_eval, [*evaluate, "--hr", none], None)]
    for script, argv, images in runs:
        with pytest.raises(SystemExit) as e:
            script.main(argv)
        line = last_json(capsys.readouterr().out)
        assert e.value.code in (3, 6) and line["images"] == images and none in line["error"]


@pytest.mark.parametrize("end", ["SIGINT", "workers hung", "lost contact"])
def test_json_stopped_names_every_stop_of_training(hr_dir, tmp_path, capsys, monkeypatch, end):
    """sr_train.py's `stopped` was null after a Ctrl-C before the first step (exit 130), a
    loader whose workers hung (exit 75, last.pt of the steps done) and a rank that could not
    meet the others (75): a pipeline that requeues on it took them for runs not stopped."""
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)  # (no requeue)
    real_step, real_setup = sr_train.train_step, sr_train.setup_process

    def setup(*args, **kwargs):
        if end == "lost contact":
            raise Resumable("could not meet the other processes at ?:? (this is rank 0 of 2)")
        os.kill(os.getpid(), signal.SIGINT)  # (Ctrl-C while the run starts)
        return real_setup(*args, **kwargs)

    def hung_in_step_2(*args, **kwargs):
        if args[4] == 1:
            raise WorkersHung("the loader's workers gave no batch for 600 s")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(*(sr_train, "train_step", hung_in_step_2) if end == "workers hung" else
                        (sr_train, "setup_process", setup))  # fmt: skip
    argv = [*train_argv(hr_dir, tmp_path / "r"), "--json"]
    code, line, err = stopped_run(sr_train, argv, capsys)
    expected = 130 if end == "SIGINT" else 75
    assert (code, line["exit_code"], line["stopped"]) == (expected, expected, end)
    assert f"sr_train.py: {'' if end == 'SIGINT' else 'error: '}{line['error']}" in err
