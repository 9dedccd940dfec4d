"""One error type per exit code, and the wrapper that turns them into one-line messages.

Exit codes (documented in the README; batch pipelines and SLURM scripts rely on them):
  0 success, 1 a fault (a traceback; sr_train.py --sync-check-every: replicas that differ),
  2 usage (bad flag or flag value), 3 data (missing/unreadable/unsuitable images),
  4 out of memory, 5 non-finite (a training abort, a NaN sample; a flow that does not invert,
  sr_sample.py --check-invertibility), 6 checkpoint or weights file
  problem, 7 output cannot be written (read-only or missing folder, a file where a folder
  belongs, disk full), 75 preempted (SIGTERM/SIGUSR1 handled, last.pt written; requeue and resume)
  or another process of the run lost (resume from the last save),
  130 interrupted (Ctrl-C outside the training loop; nothing half-written is left).
"""

import codecs
import contextlib
import errno
import json
import math
import os
import select
import signal
import sys
import threading
import warnings
from collections.abc import Iterable
from typing import NoReturn

from sr_lib.threads import stop_pools, when_not_held

EXIT_USAGE = 2
EXIT_DATA = 3
EXIT_OOM = 4
EXIT_NONFINITE = 5
EXIT_CHECKPOINT = 6
EXIT_OUTPUT = 7
EXIT_PREEMPTED = 75
EXIT_INTERRUPTED = 130  # the shell's code for a process ended by SIGINT


class SRSpaceError(Exception):
    """Base class: an expected failure with a one-line, actionable message."""

    exit_code = 1


class UsageError(SRSpaceError):
    exit_code = EXIT_USAGE


class DataError(SRSpaceError):
    """An image, folder or dataset that cannot be used (the message names the file)."""

    exit_code = EXIT_DATA


class CheckpointError(SRSpaceError):
    """A checkpoint or weights file that is missing, corrupt, mismatched or unsafe."""

    exit_code = EXIT_CHECKPOINT


class NonFiniteError(SRSpaceError):
    exit_code = EXIT_NONFINITE


class Resumable(SRSpaceError):
    """A run stopped before its end that `--resume auto` continues (the message says from which
    step): another process of a multi-process run was lost."""

    exit_code = EXIT_PREEMPTED


class OutOfMemory(SRSpaceError):
    """Out of memory where the work done so far could be saved first (the message says where)."""

    exit_code = EXIT_OOM


_last_error = {"text": ""}  # the message of the last error exit_on_error printed
_stdout = {"lost": ""}  # why standard output can no longer be written; "" while it can
_LOST = (errno.EPIPE, errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO)


def stdout_closed(e: BaseException | None = None) -> str:
    """Why standard output can no longer be written ("" while it can): the program reading it
    ended (a pipe into `head` that exited, a killed `tee`), or its file's disk is full.

    Given the error `e` of a write (for EPIPE, stdout's pipe is checked), says whether that was
    stdout's loss ("" if not); then file descriptor 1 is pointed at /dev/null: later prints, and
    Python's flush at exit, are dropped instead of failing again. The scripts then stop without
    losing work, or go on where their results go to files (docs/exit-codes.md)."""
    if e is None:
        return _stdout["lost"]
    if _stdout["lost"] or not (isinstance(e, OSError) and e.errno in _LOST):
        return ""  # not stdout's: once lost, stdout writes to /dev/null and cannot fail
    try:
        fd = sys.stdout.fileno()
        if e.errno == errno.EPIPE:
            poll = select.poll()
            poll.register(fd, 0)  # the write end of a pipe without a reader reports POLLERR
            if not any(events & select.POLLERR for _, events in poll.poll(0)):
                return ""  # another pipe's
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, fd)
        os.close(null)
    except (OSError, ValueError, AttributeError):  # no file descriptor (a captured stdout)
        return ""
    why = f"cannot be written ({e.strerror})"
    _stdout["lost"] = "closed (the program reading it ended)" if e.errno == errno.EPIPE else why
    return _stdout["lost"]


def print_out(text: str) -> bool:
    """print(text) on stdout, one printable line (`one_line`: a closing line's `-> OUT` as
    typed); False, and nothing printed, where stdout cannot be written any more
    (`stdout_closed`: the caller decides what that means for its run)."""
    if stdout_closed():
        return False
    try:
        print(one_line(text), flush=True)
    except OSError as e:
        if not stdout_closed(e):
            raise
        return False
    return True


def printable(text: str, encoding: str = "utf-8") -> str:
    """`text` as `encoding` can hold it: what it cannot (a σ in ASCII; the bytes of a file name
    that is not UTF-8, held as surrogates) as backslash escapes. For labels, tags and table
    cells, whose width or bytes must be known before they are written. A byte that is not UTF-8
    is \\xHH, as in every line (`one_line`)."""
    if any(map(surrogate, text)):
        text = "".join(escaped(c) if surrogate(c) else c for c in text)
    return text.encode(encoding, "backslashreplace").decode(encoding)


_ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}


def surrogate(c: str) -> bool:
    """Whether `c` holds a byte that is not UTF-8 (os.fsdecode's U+DC80..U+DCFF)."""
    return 0xDC80 <= ord(c) <= 0xDCFF


def escaped(c: str) -> str:
    """A character that is not printable as the escape that shows it: \\n, \\r, \\t, \\xHH (ESC:
    \\x1b; a byte that is not UTF-8, os.fsdecode's surrogate U+DC80..U+DCFF: that byte), \\uHHHH."""
    if c in _ESCAPES:
        return _ESCAPES[c]
    if ord(c) < 0x80 or surrogate(c):
        return f"\\x{ord(c) & 0xFF:02x}"
    return f"\\u{ord(c):04x}" if ord(c) <= 0xFFFF else f"\\U{ord(c):08x}"


def one_line(text: str, quoted: Iterable[str] = ()) -> str:
    """`text` as one printable line: each character that is not printable as its escape
    (`escaped`). An error or warning line shows a path as typed (`--hr DIR: ...`, `DIR: skipped
    ...`): a newline in its name broke the line in two, a \\r wrote over its start, an ESC
    sequence drove the terminal; a backslash is left as it is (a $'...' path already quoted).
    A byte that is not UTF-8 (a surrogate) is its \\xHH too, as bash's $'...' reads it back: the
    streams wrote \\udcXX (backslashreplace, which no shell reads), or under a C locale the byte
    itself (surrogateescape: the terminal's replacement character).

    `quoted`: the texts of the errors `text` quotes (`quoted_errors`: a library's, such as torch's
    `str(e)`). Where one of them holds several lines, their line breaks are the library's, not a
    name's: it is shown as its lines (`joined_lines`), not with \\n escapes."""
    for said in quoted:
        if "\n" in said and said in text:
            text = text.replace(said, joined_lines(said))
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else escaped(c) for c in text)


# A library's text of several lines, joined, is shown whole up to this many characters (a
# message: torch's "Error(s) in loading state_dict ...:", its CUDA errors' advice); longer, it
# is a dump (torch's C++ stack under TORCH_SHOW_CPP_STACKTRACES=1: 20 lines and more), and
# its first line says what went wrong.
JOINED_MAX = 300
# Set to 1, a library's text cut to its first line follows its line whole (`whole_texts`).
FULL_ERRORS = "SRSPACE_FULL_ERRORS"


def joined_lines(text: str) -> str:
    """A library's message of several lines as one: its lines, stripped, blank ones left out,
    joined by "; " (by a space after one ending in ':'), where that is at most JOINED_MAX
    characters; else (`cut_short`) its first line (and the next where it ends in ':', as
    dynamo's "backend='inductor' raised:"), how many more there are, and how to see them
    (FULL_ERRORS). The one rule for every line that shows a library's text."""
    lines, first = _lines(text)
    if not cut_short(text):
        return _joined(lines)
    left = len(lines) - first
    more = "1 more line: {}=1 shows it" if left == 1 else f"{left} more lines: {{}}=1 shows them"
    return f"{' '.join(lines[:first])} (and {more.format(FULL_ERRORS)})"


def cut_short(text: str) -> bool:
    """Whether `joined_lines` cuts `text`: its lines, joined, pass JOINED_MAX characters and
    there are more than those it keeps."""
    lines, first = _lines(text)
    return len(lines) > first and len(_joined(lines)) > JOINED_MAX


def _lines(text: str) -> tuple[list[str], int]:
    """`text`'s lines, stripped, blank ones left out; and how many of them a cut keeps."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines, 2 if lines and lines[0].endswith(":") else 1


def _joined(lines: list[str]) -> str:
    joined = lines[0] if lines else ""
    for line in lines[1:]:
        joined += (" " if joined.endswith(":") else "; ") + line
    return joined


def whole_texts(quoted: Iterable[str], line: str) -> str:
    """Under FULL_ERRORS=1, the texts of `quoted` that `joined_lines` cuts and `line` (one_line's)
    shows so cut, whole, for after their line ("" otherwise, or where none is): each introduced
    by a line that says so, each of its lines indented and printable (`one_line`), so that no
    line of it passes for srspace's own. A text that the line does not quote (its error said in
    srspace's words: a checkpoint's pickled objects) is not said to be cut; one within another
    shown (torch's weights-only error quotes the unpickler's, its context) is shown once."""
    if os.environ.get(FULL_ERRORS, "0") in ("", "0"):
        return ""
    texts = [said for said in dict.fromkeys(quoted)
             if cut_short(said) and one_line(joined_lines(said)) in line]  # fmt: skip
    lines = []
    for said in texts:
        if not any(said != other and said in other for other in texts):
            lines += [f"  its whole text ({FULL_ERRORS}=1):"]
            lines += [f"    {one_line(line)}" for line in said.splitlines()]
    return "".join(f"\n{line}" for line in lines)


def quoted_errors(e: BaseException) -> list[str]:
    """The texts of the libraries' exceptions behind `e` (its cause and context, which `raise
    ... from None` keeps), which `e`'s message may quote: `one_line`'s `quoted`. Not srspace's
    own (an error re-raised with more words): their line breaks are a name's."""
    said, seen = [], {id(e)}
    e = e.__cause__ or e.__context__
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if not isinstance(e, SRSpaceError):
            said.append(str(e))
        e = e.__cause__ or e.__context__
    return said


def say_err(text: str, quoted: Iterable[str] = ()) -> None:
    """A line on stderr, one printable line (`one_line`; `quoted`: the libraries' texts it
    quotes, joined, and whole after it under FULL_ERRORS=1: `whole_texts`), dropped where stderr
    cannot be written either (`2>&1 | head`)."""
    quoted = list(quoted)
    with contextlib.suppress(OSError):
        line = one_line(text, quoted)
        print(line + whole_texts(quoted, line), file=sys.stderr, flush=True)


def said_error(e: BaseException) -> str:
    """`e`'s text as one line: srspace's own, escaped (`one_line`), with the libraries' texts it
    quotes joined (`quoted_errors`): for a line that shows an error caught, as exit_on_error's
    does. A library's own error (e.g. torch's, whose text this line quotes) is its text joined,
    or its type's name where it has none."""
    if not isinstance(e, SRSpaceError):
        return joined_lines(str(e)) or type(e).__name__
    return one_line(str(e), quoted_errors(e))


def warning_quotes(message, filename: str) -> list[str]:
    """A warning's libraries' texts (`one_line`'s `quoted`): its whole text where it was raised
    outside srspace's files (torch's, Pillow's, Python's own: their line breaks are theirs), none
    where srspace raised it (a line break there is a name's, as in an error line). torch's
    warnings from C++, and a library's raised with a stacklevel that names its caller, give the
    line of srspace that called it: srspace's own, escaped."""
    where = str(filename or "")  # ("sys", "<string>": no file; taken as srspace's)
    installed = {"site-packages", "dist-packages"} & set(where.split(os.sep))  # (a venv in it)
    ours = not os.path.isabs(where) or (where.startswith(_HERE) and not installed)
    return [] if ours else [str(message)]


_HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep  # the scripts' folder


# Python's error for a thread whose stack (8 MB of address space) cannot be mapped: seen under a
# `ulimit -v` (sr_eval.py's resizing threads, a traceback, exit 1); a limit on the number of
# processes (ulimit -u, a cgroup's pids.max) gives it too, rarely reached by these scripts.
NO_THREAD = "can't start new thread"


def is_out_of_memory(e: BaseException) -> bool:
    """torch reports CPU allocation failures as RuntimeError("... can't allocate memory") and
    CUDA ones as torch.OutOfMemoryError (a RuntimeError); a thread's stack is the host's
    memory too (NO_THREAD)."""
    text = str(e)
    return isinstance(e, MemoryError) or (
        isinstance(e, RuntimeError)
        and ("out of memory" in text.lower() or "can't allocate memory" in text
             or NO_THREAD in text)
    )  # fmt: skip


def host_out_of_memory(e: BaseException, device) -> bool:
    """Whether out-of-memory error `e` of a run on `device` ran out of the host's memory (a
    MemoryError, torch's "can't allocate memory", a thread's stack, any on a CPU), not a
    GPU's."""
    text = str(e)
    return (device.type == "cpu" or isinstance(e, MemoryError) or "can't allocate" in text
            or NO_THREAD in text)  # fmt: skip


def any_of(helps: list[str]) -> str:
    """What helps, in words: "a", "a or b", "a, b or c"."""
    return helps[0] if len(helps) == 1 else f"{', '.join(helps[:-1])} or {helps[-1]}"


class OutputError(SRSpaceError):
    """An output file or folder that cannot be written (the message names it)."""

    exit_code = EXIT_OUTPUT


class Stopped(SRSpaceError):
    """Stopped by a signal where nothing was left half done (the message says how to go on)."""

    exit_code = EXIT_PREEMPTED


class NodeWarning(UserWarning):
    """A warning about this process's own node: its copy of the images, its --cache. Under
    several processes each rank prints its own, naming itself; any other warning is the same on
    every rank and printed by rank 0 alone (sr_lib/distributed.py `warn_once`)."""


class Preempted(BaseException):
    """SIGTERM/SIGUSR1/SIGHUP raised where a script stops at once (args[0]: what to say): a
    BaseException, as KeyboardInterrupt, so that no `except Exception` swallows it."""


OLDEST_TORCH = "2.6"  # requirements.txt: torch.nn.utils.get_total_norm (the finite check)


def check_torch() -> None:
    """A torch older than requirements.txt allows (a cluster's module, an old environment) is
    one line at start, not an AttributeError in the middle of a run."""
    import torch  # here: the scripts import it anyway, this module stays light

    if torch.__version__ < OLDEST_TORCH:  # TorchVersion compares as a version
        raise UsageError(
            f"torch {torch.__version__} is too old: srspace needs torch >= {OLDEST_TORCH} "
            f"(pip install -r requirements.txt)"
        )


def open_closed_std_streams() -> None:
    """A standard stream closed when the script started (`>&-`, `2>&-`, a launcher that closes
    them) is opened on /dev/null, as a daemon does. Python leaves sys.stdout None there, where
    the scripts stopped with an AttributeError traceback; and the first file opened would take
    file descriptor 1 or 2, where a library writing to stdout or stderr (torch's C++ warnings)
    would write into it: a checkpoint, a sample."""
    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        if getattr(sys, name) is not None:
            continue
        try:
            os.fstat(fd)
            continue  # already taken by a file: not ours to replace
        except OSError:
            pass
        null = os.open(os.devnull, os.O_RDWR)  # the lowest free descriptor: fd, or below it
        if null != fd:
            os.dup2(null, fd)
            os.close(null)
        stream = open(fd, mode, encoding="utf-8", errors="backslashreplace", closefd=False)
        setattr(sys, name, stream)


@contextlib.contextmanager
def exit_on_error(prog: str, out_of_memory: str = "out of memory"):
    """Print expected errors as one line `prog: error: message` and exit with their code.

    An out-of-memory error that no code caught is the line `out_of_memory`, exit 4: each script
    names its own flags that lower its memory.

    Warnings (e.g. an alpha channel dropped) are printed as one line `prog: warning: message`
    (`warning_line`: a library's lines joined), each (its category and text) once
    (`shown_once`).
    A torch older than srspace needs is such an error (`check_torch`). A standard stream closed
    at start is opened on /dev/null (`open_closed_std_streams`).

    Standard output writes what its encoding cannot hold as backslash escapes, as Python's
    stderr does: a σ in a help text on an ASCII or latin-1 terminal, a file name that is not
    UTF-8 (its bytes held as surrogates) in a progress line. Strict, either stopped the run.
    """
    open_closed_std_streams()
    show = warnings.formatwarning
    errors = getattr(sys.stdout, "errors", None)  # surrogateescape fails too, on a σ in ASCII
    utf8 = codecs.lookup(getattr(sys.stdout, "encoding", None) or "utf-8").name == "utf-8"
    failing = errors == "strict" or (errors == "surrogateescape" and not utf8)
    failing = failing and hasattr(sys.stdout, "reconfigure")  # (not a file-like stand-in)
    if failing:
        sys.stdout.reconfigure(errors="backslashreplace")
    warnings.formatwarning = formatted(prog)
    shown = warnings.showwarning
    warnings.showwarning = shown_once(shown)
    # Ctrl-C waits for the end of a thread pool's lock code (sr_lib/threads.py). Left alone where
    # SIGINT is ignored (a job started in the background) or handled by the caller.
    main = threading.current_thread() is threading.main_thread()
    python_default = main and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    if python_default:
        signal.signal(signal.SIGINT, when_not_held(signal.default_int_handler))
    try:
        check_torch()
        yield
    except SRSpaceError as e:
        msg = said_error(e)  # (a library's lines, joined)
        _last_error["text"] = msg  # for the --json line (Summary): the line's message
        say_err(f"{prog}: error: {msg}", quoted_errors(e))
        raise SystemExit(e.exit_code) from None
    except KeyboardInterrupt as e:  # files are written atomically: nothing half-written remains
        interrupted(prog, *e.args[:1])
    except BrokenPipeError as e:  # stdout's reader ended before any work that could be kept
        if not stdout_closed(e):
            raise  # another pipe: a bug
        say_err(f"{prog}: error: standard output {stdout_closed()}; stopped")
        raise SystemExit(EXIT_OUTPUT) from None
    except Exception as e:
        if during_interrupt(e):  # a library's cleanup broken by the KeyboardInterrupt: not a bug
            interrupted(prog)
        if not (isinstance(e, (MemoryError, RuntimeError)) and is_out_of_memory(e)):
            raise  # a real bug: its traceback
        _last_error["text"] = out_of_memory
        say_err(f"{prog}: error: {_last_error['text']}")
        raise SystemExit(EXIT_OOM) from None
    finally:
        warnings.formatwarning, warnings.showwarning = show, shown
        if failing:
            with contextlib.suppress(OSError, ValueError):  # a stdout already closed
                sys.stdout.reconfigure(errors=errors)
        if python_default:
            signal.signal(signal.SIGINT, signal.default_int_handler)


def warning_line(prog: str, message, filename: str) -> str:
    """A warning as `prog: warning: TEXT`, one printable line (a library's lines joined:
    `warning_quotes`), and under FULL_ERRORS=1 a library's text it cut, whole after it."""
    quoted = warning_quotes(message, filename)
    line = f"{prog}: warning: {one_line(str(message), quoted)}"
    return line + whole_texts(quoted, line)


def formatted(prog: str):
    """A warnings.formatwarning that writes `warning_line`s."""
    return lambda message, category, filename, *args, **kwargs: (
        warning_line(prog, message, filename) + "\n"
    )


def shown_once(show):
    """A warnings.showwarning that passes each warning (its category and text) to `show` once:
    the "default" filter's own once is per place in the code and forgotten whenever the filters
    change (warnings.simplefilter, the end of any catch_warnings, as in srspace's loaders and
    torch's), so torch's DataLoader warning of too many workers, raised at its creation and
    again at each iter(), was two identical lines in one run. Another text or category is
    shown."""
    seen = set()

    def once(message, category, *args, **kwargs):
        said = (category, str(message))
        if said in seen:
            return
        seen.add(said)
        show(message, category, *args, **kwargs)

    return once


def catch(signum: int, handler):
    """signal.signal(signum, handler), unless signum is SIGINT or SIGHUP and ignored: a shell
    starts the background jobs of a script (`cmd &`) with SIGINT ignored, so that Ctrl-C in its
    terminal does not reach them, `nohup` a command with SIGHUP ignored, and a program keeps them
    so (as Python itself does). SIGTERM and SIGUSR1 are always caught: they are how SLURM ends and
    preempts a job, and a run must save then.
    Returns the handler before, to put back (SIG_DFL for one not installed from Python)."""
    kept = signum in (signal.SIGINT, signal.SIGHUP)
    if kept and signal.getsignal(signum) is signal.SIG_IGN:
        return signal.SIG_IGN
    return signal.signal(signum, handler) or signal.SIG_DFL


# SLURM's, a closed terminal's: the scripts stop, resumably (exit 75); SIGINT is Ctrl-C's
PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)
_early = {"signal": None}  # one of them, recorded by `record_stop_signals` (None: none came)


def record_stop_signals() -> None:
    """The first thing a script run as a program does, before it imports torch (seconds; a
    minute on a cluster's busy file system): SIGTERM, SIGUSR1 and SIGHUP are recorded from here
    on instead of ending the process at once, silently (their default action: exit 143, 138,
    129, which no job script takes for a preemption to requeue). `replay_stop_signal` hands one
    to the script's own handlers once they are in place."""

    def record(signum, frame):
        _early["signal"] = _early["signal"] or signum

    for s in PREEMPT_SIGNALS:  # (a SIGHUP ignored at start stays ignored: nohup)
        catch(s, record)


# The third-party modules the scripts import at their start, and the requirement (pip's name)
# that installs each. (lpips, matplotlib and tensorboard come later, with the work that needs
# them; scipy too, except in sr_eval.py: `require_packages`'s `more`.)
START_PACKAGES = {"numpy": "numpy", "torch": "torch", "PIL": "pillow", "imageio": "imageio",
                  "png": "pypng", "imagecodecs": "imagecodecs",
                  "argparse_dataclass": "argparse-dataclass", "rich": "rich"}  # fmt: skip


def require_packages(prog: str, more: dict[str, str] | None = None) -> None:
    """The second thing a script run as a program does, before its own imports of these
    packages (and of `more`, module: requirement): a Python without one of them (the
    requirements not installed in this venv), or one whose virtual memory limit (`ulimit -v`,
    set on some clusters' login nodes) is too low to map torch's libraries, stopped with a
    traceback ("libtorch_cpu.so: failed to map segment from shared object"). One line instead,
    and the --json line where asked for, exit 2. A warning these imports raise (torch's about
    its NumPy) is one line as in the run (`warning_line`), not Python's two, its source line
    under it: exit_on_error's formatter is not in place yet."""
    import importlib
    import resource

    warnings.formatwarning = formatted(prog)
    for module, requirement in {**START_PACKAGES, **(more or {})}.items():
        try:
            importlib.import_module(module)
        except ImportError as e:
            limit = resource.getrlimit(resource.RLIMIT_AS)[0]
            if isinstance(e, ModuleNotFoundError) and e.name:
                what = (f"this Python ({sys.executable}) lacks the package {requirement} (no "
                        f"module {e.name}); install the requirements: pip install -r "
                        "requirements.txt")  # fmt: skip
            elif limit != resource.RLIM_INFINITY and "failed to map segment" in str(e):
                what = (f"{requirement} cannot be loaded within this process's virtual memory "
                        f"limit (ulimit -v: {limit // 2**20} MB; {e}); raise it (ulimit -v "
                        "unlimited) or run where there is no such limit")  # fmt: skip
            else:
                what = (f"{requirement} cannot be imported ({type(e).__name__}: {e}); reinstall "
                        "the requirements: pip install -r requirements.txt")  # fmt: skip
            say_err(f"{prog}: error: {what}")
            argv = sys.argv[1:]
            if "--json" in argv[: argv.index("--") if "--" in argv else None]:
                record = {"script": prog, "exit_code": 2, "error": what}
                print_out(json.dumps(record))
            raise SystemExit(2) from None


def replay_stop_signal() -> None:
    """The signal `record_stop_signals` recorded, if any, raised again for the handlers now in
    place (they run before this returns)."""
    signum, _early["signal"] = _early["signal"], None
    if signum is not None:
        signal.raise_signal(signum)


def interrupted(prog: str, how_far: str = "") -> NoReturn:
    """Ctrl-C's line, "PROG: interrupted", and `how_far` the run got (a KeyboardInterrupt's
    argument: what is kept where, as sr_eval.py says) after it."""
    stop_pools()  # whose `finally` the KeyboardInterrupt skipped (sr_lib/threads.py)
    _last_error["text"] = f"interrupted {how_far}" if how_far else "interrupted"
    say_err(f"{prog}: {_last_error['text']}")
    raise SystemExit(EXIT_INTERRUPTED) from None


def during_interrupt(e: BaseException) -> bool:
    """Whether `e` was raised while a KeyboardInterrupt was being handled."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return True
        seen.add(id(e))
        e = e.__context__
    return False


class Summary:
    """A script's closing line: `done: ...` as text, or with --json one JSON object on the last
    line of stdout: {"script", "exit_code", "error" (the error line's message, or null), and the
    script's own fields}, also after a stop (75) or an error (the fields known by then). A
    pipeline reads it with json.loads (docs/exit-codes.md). Use as a context manager around
    `exit_on_error` (the error line comes first, on stderr), and `return summary.end(code)`."""

    def __init__(self, prog: str):
        self.prog, self.json, self.fields, self.said = prog, False, {}, False

    def update(self, **fields) -> None:
        self.fields.update(fields)

    def line(self, text: str, say=None, **fields) -> None:
        """The closing line: `text` through `say` (default: stdout), or its fields for --json."""
        self.fields.update(fields)
        if not self.json:
            (say or print_out)(text)

    def end(self, code: int) -> int:
        if self.json and not self.said:
            self.said = True
            error = _last_error["text"] or None  # (None also for a stop without an error)
            record = {"script": self.prog, "exit_code": code, "error": error, **self.fields}
            print_out(json.dumps(_finite(record)))  # (where stdout is lost: nowhere to go)
        return code

    def __enter__(self) -> "Summary":
        _last_error["text"] = ""
        return self

    def __exit__(self, kind, e, tb) -> None:
        if kind is SystemExit:
            self.end(e.code if isinstance(e.code, int) else 1)
        elif kind is not None and issubclass(kind, Exception):  # a bug: its traceback, exit 1
            _last_error["text"] = f"{kind.__name__}: {e}"
            self.end(1)


def _finite(v):
    """`v` with inf as "inf"/"-inf" and NaN as null, as the results' JSON files write them (a
    json.dumps of NaN is not JSON)."""
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v
