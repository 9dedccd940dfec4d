"""Signals while the main thread drives a thread pool (sr_lib/threads.py).

Python runs a signal's handler between any two bytecodes of the main thread, also inside the lock
code of `threading` that `concurrent.futures` uses. Ctrl-C there once hung `sr_train.py` for good
(a pool's lock left held, its threads blocked, the exit joining them) or printed a traceback
("release unlocked lock"). These tests raise the signal at every line the main thread runs in
`threading` and `concurrent.futures` during each pool use of the scripts, one run per line, each
time in a child process (one for all the cases: the interpreter starts once) that must end with
the script's one-line exit.

Run as `python -m tests.test_threads OP SIGNAL FOLDER` (from the repository root) to sweep one
case, its files in FOLDER; more OP SIGNAL pairs before FOLDER sweep those too, in turn.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WATCHED = (os.sep + "threading.py", os.sep.join(("", "concurrent", "futures", "")))


def _ops(tmp: Path) -> dict:
    """Each pool use of the scripts, as a function of no arguments."""
    import imageio.v3 as iio
    import numpy as np

    import sr_sample
    from sr_lib import data, resize

    rng = np.random.default_rng(0)
    files = []
    for i in range(6):
        files.append(tmp / f"photo ({i}).png")
        iio.imwrite(files[-1], rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    resize._threads = lambda: 2  # two threads on any machine
    # Resized in 4 row blocks, then 2 column blocks, as a 512 x 512 image is at the usual block
    # size (1 << 17): the same pool uses and the same lines of its lock code, 16x fewer pixels.
    resize._BLOCK = 1 << 13
    big = rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)

    def write_samples():
        with sr_sample.SampleWriter(2) as writer:
            for i in range(4):
                writer([tmp / f"sample {i}.png"], big[:8, :8])

    return {
        # sr_train.py: decoding the training images (PatchPairs)
        "thread_map": lambda: data._thread_map(lambda x: (time.sleep(0.001), x)[1], [(0,), (1,)]),
        # sr_eval.py: decoding the samples of the next image while LPIPS runs
        "read_ahead": lambda: list(data.read_ahead([files[:2], files[2:4], files[4:]], 2)),
        # every script: MATLAB-bicubic resizing in row blocks on threads
        "imresize": lambda: resize.imresize(big, 0.5),
        # sr_sample.py: writing the PNGs while the model draws the next ones
        "sample_writer": write_samples,
    }


def _sweep(op: str, signum: int, tmp: Path) -> dict:
    """Run `op` once per line event in the watched modules, raising `signum` at that event; its
    images in the folder `tmp`."""
    import sr_sample
    from sr_lib.errors import exit_on_error

    fn = _ops(tmp)[op]
    handlers = sr_sample.SIGNALS if op == "sample_writer" else contextlib.nullcontext()

    def once(at: int) -> tuple[int, object, int]:
        count = 0

        def line(frame, event, arg):
            nonlocal count
            if event == "line":
                count += 1
                if count == at:
                    signal.raise_signal(signum)  # its handler runs here, inside the lock code
            return line

        def call(frame, event, arg):
            return line if frame.f_code.co_filename.endswith(WATCHED[0]) or (
                WATCHED[1] in frame.f_code.co_filename) else None  # fmt: skip

        outcome = "returned"
        try:
            with exit_on_error("sweep"), handlers:
                sys.settrace(call)
                try:
                    fn()
                finally:
                    sys.settrace(None)
        except SystemExit as e:
            outcome = e.code
        except sr_sample.Preempted:  # sr_sample.main: then exit 75
            outcome = "preempted"
        except BaseException as e:  # noqa: BLE001 (the failure being looked for)
            sys.settrace(None)
            outcome = f"{type(e).__name__}: {e}"
        deadline = time.time() + 5  # the pool's threads end unless one is blocked for good
        while threading.active_count() > 1 and time.time() < deadline:
            time.sleep(0.001)
        return count, outcome, threading.active_count() - 1

    lines, outcome, left = once(0)
    assert outcome == "returned" and not left, (outcome, left)
    expected = 130 if signum == signal.SIGINT else "preempted"
    report = {"lines": lines, "fired": 0, "bad": []}
    for at in range(1, lines + lines // 4 + 1):  # a run's line count varies with thread timing
        count, outcome, left = once(at)
        fired = count >= at
        report["fired"] += fired
        if outcome != (expected if fired else "returned") or left:
            report["bad"].append(dict(line=at, outcome=outcome, threads_left=left))
    return report


CASES = [
    ("thread_map", "SIGINT"),
    ("read_ahead", "SIGINT"),
    ("imresize", "SIGINT"),
    ("sample_writer", "SIGINT"),
    ("sample_writer", "SIGTERM"),
]


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory) -> dict:
    """The sweeps of all CASES, in turn in one child process (each its own folder of files):
    {"OP SIGNAL": report}, or the failed process."""
    tmp = tmp_path_factory.mktemp("sweeps")
    temp = tmp / "TMPDIR"
    temp.mkdir()
    p = subprocess.run([sys.executable, "-m", "tests.test_threads",
                        *(x for case in CASES for x in case), tmp],
                       cwd=REPO, env={**os.environ, "TMPDIR": str(temp)}, capture_output=True,
                       text=True, timeout=300)  # fmt: skip
    return {"process": p, "temp": list(temp.iterdir())}


@pytest.mark.integration  # one run per line of the lock code (pyproject: pytest -m integration)
@pytest.mark.xdist_group("test_threads_sweeps")  # the module's one child process, on one worker
@pytest.mark.parametrize("op, signum", CASES)
def test_a_signal_at_any_line_of_the_lock_code_gives_the_one_line_exit(op, signum, sweeps):
    """Every run interrupted ends as the script would (exit 130 on Ctrl-C; sr_sample's
    Preempted on SIGTERM, then exit 75), every other run returns, and no pool thread is left
    blocked. A hang shows as a timeout. Its files are in a folder of the test's, none left in
    the system's temporary folder (a folder of images there per run, before)."""
    p = sweeps["process"]
    assert p.returncode == 0, p.stderr[-3000:]
    assert not sweeps["temp"]
    report = json.loads(p.stdout.splitlines()[-1])[f"{op} {signum}"]
    assert report["fired"] > 100, report  # the sweep reached the pool's lock code
    assert not report["bad"], report["bad"][:10]


def test_an_error_while_ctrl_c_is_handled_is_the_one_line_exit(capsys):
    """Lock code that no handler can defer (a library's own pool, torch's loader) broken by
    Ctrl-C raises its own error from the KeyboardInterrupt: still `interrupted`, exit 130. The
    same error without Ctrl-C is a bug and keeps its traceback."""
    from sr_lib.errors import exit_on_error

    with pytest.raises(SystemExit) as e, exit_on_error("prog"):
        try:
            raise KeyboardInterrupt
        finally:
            raise RuntimeError("release unlocked lock")
    assert e.value.code == 130 and capsys.readouterr().err == "prog: interrupted\n"
    with pytest.raises(RuntimeError, match="release unlocked lock"), exit_on_error("prog"):
        raise RuntimeError("release unlocked lock")


def test_handlers_wait_for_the_end_of_the_held_block_and_are_restored():
    from sr_lib.errors import exit_on_error
    from sr_lib.threads import signals_held

    # Python's own handler, as in a script (in-process script tests put theirs back: see below)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with pytest.raises(SystemExit), exit_on_error("prog"):
        reached = []
        with pytest.raises(KeyboardInterrupt):
            with signals_held():
                with signals_held():
                    signal.raise_signal(signal.SIGINT)
                    reached.append("inner")
                reached.append("outer")  # nested: delivered at the end of the outermost
        assert reached == ["inner", "outer"]
        signal.raise_signal(signal.SIGINT)  # outside a block: at once
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_ignored_sigint_or_sighup_stays_ignored_and_sigterm_is_always_caught():
    """A shell's background job (`cmd &`: SIGINT) and `nohup` (SIGHUP) start a script with the
    signal ignored, and the scripts keep it so; SIGTERM, SLURM's stop, is caught all the same."""
    from sr_lib.errors import catch

    def handler(signum, frame):
        pass

    sigs = (signal.SIGINT, signal.SIGHUP, signal.SIGTERM)
    saved = {s: signal.getsignal(s) for s in sigs}
    try:
        for s in sigs:
            signal.signal(s, signal.SIG_IGN)
        for s in sigs:
            assert catch(s, handler) is signal.SIG_IGN  # what to put back
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is handler
        signal.signal(signal.SIGHUP, signal.SIG_DFL)  # not under nohup: caught
        assert catch(signal.SIGHUP, handler) is signal.SIG_DFL
        assert signal.getsignal(signal.SIGHUP) is handler
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


def test_sr_train_main_called_from_python_puts_the_handlers_back(tmp_path):
    """sr_train.py's loop turns SIGINT/SIGTERM/SIGUSR1/SIGHUP into "save and stop"; a caller of
    main() (a notebook, a test) gets its own handlers back afterwards, so Ctrl-C works again."""
    import sr_train

    before = {s: signal.getsignal(s) for s in sr_train.STOP_SIGNALS}
    assert sr_train.main(["--model", "edsr", "--n-feats", "8", "--n-blocks", "1", "--data", "demo",
                          "--scale", "2", "--patch", "8", "--batch", "1", "--workers", "0",
                          "--steps", "1", "--out", str(tmp_path / "run")]) == 0  # fmt: skip
    assert {s: signal.getsignal(s) for s in sr_train.STOP_SIGNALS} == before


def test_a_signal_while_a_stop_is_handled_does_not_cut_its_cleanup_short():
    """Ctrl-C pressed twice (or `timeout`'s SIGINT to its process group after the terminal's)
    raised a second KeyboardInterrupt inside the first one's cleanup, cutting it short. A signal
    that comes while a stop is handled is dropped now; once it is handled, the next one acts."""
    from sr_lib.threads import signals_held, when_not_held

    handler, cleaned = when_not_held(signal.default_int_handler), []
    with pytest.raises(KeyboardInterrupt):
        try:
            handler(signal.SIGINT, None)
        finally:
            handler(signal.SIGINT, None)  # again, during the cleanup
            with pytest.raises(SystemExit):  # and where the stop became an exit
                try:
                    raise SystemExit(130)
                finally:
                    handler(signal.SIGINT, None)
            cleaned.append("whole")
    assert cleaned == ["whole"]
    with pytest.raises(KeyboardInterrupt):
        handler(signal.SIGINT, None)  # no stop under way: at once
    with pytest.raises(KeyboardInterrupt):  # a held one, where the block ends by an error
        with signals_held():
            handler(signal.SIGINT, None)
            raise ValueError("an error is no stop")


def test_a_stop_the_caller_handled_before_does_not_drop_the_next_signal():
    """A signal is dropped only during the stop its own handler raised. One that a caller of
    main() from Python caught and handles (a KeyboardInterrupt of its own, main() called again
    in its `except`: a retry, a notebook's cleanup) is no stop of this run: every SIGTERM of the
    run was dropped there (sr_train.py's loop never saw SLURM's, the job killed unsaved)."""
    from sr_lib.threads import signals_held, when_not_held

    handler = when_not_held(signal.default_int_handler)
    try:
        raise KeyboardInterrupt  # the caller's own, caught
    except KeyboardInterrupt:
        with pytest.raises(KeyboardInterrupt):
            handler(signal.SIGINT, None)
        with pytest.raises(KeyboardInterrupt):  # and one held to a block's end
            with signals_held():
                handler(signal.SIGINT, None)
    try:
        raise SystemExit(130)  # an exit the caller caught (unittest, click, a REPL)
    except SystemExit:
        with pytest.raises(KeyboardInterrupt):
            handler(signal.SIGINT, None)


def test_sr_eval_stopped_twice_still_removes_its_half_report(tmp_path, capsys, monkeypatch):
    """sr_eval.py --report stopped midway removes the report files it wrote (no page shows them).
    A second stop signal while it removed them (SIGTERM to the job step and again to the process
    group; Ctrl-C thrice in a terminal: the report and its `.sr_eval_unfinished` mark stayed,
    and a traceback at exit) cut the removal short: it finishes now."""
    from test_eval_report import sweep_world

    import sr_eval
    import sr_lib.report

    hr_dir, sweep, _ = sweep_world(tmp_path, n=2)
    rep = tmp_path / "report"
    sheet, remove_half = sr_lib.report.contact_sheet, sr_lib.report.remove_half

    def stop_after_the_first_sheet(*args):
        page = sheet(*args)
        os.kill(os.getpid(), signal.SIGTERM)
        return page

    def stopped_again(folder):
        os.kill(os.getpid(), signal.SIGTERM)
        remove_half(folder)

    monkeypatch.setattr(sr_lib.report, "contact_sheet", stop_after_the_first_sheet)
    monkeypatch.setattr(sr_lib.report, "remove_half", stopped_again)
    argv = ["--hr", hr_dir, "--sr", sweep / "T0", "--scale", 4, "--n", 2, "--no-lpips",
            "--report", rep, "--quiet"]  # fmt: skip
    with pytest.raises(SystemExit) as e:
        sr_eval.main([str(a) for a in argv])
    err = capsys.readouterr().err.splitlines()
    assert e.value.code == 75 and len(err) == 1 and "stopped by SIGTERM" in err[0], err
    assert sorted(p.name for p in rep.iterdir()) == [], sorted(rep.rglob("*"))


if __name__ == "__main__":
    *pairs, folder = sys.argv[1:]
    reports = {}
    for op, name in zip(pairs[::2], pairs[1::2]):
        tmp = Path(folder) / f"{op} {name}"
        tmp.mkdir()
        reports[f"{op} {name}"] = _sweep(op, signal.Signals[name], tmp)
    print(json.dumps(reports))
