"""Command-line parsing shared by the three scripts (argparse-dataclass, flat dataclasses).

Each script declares its own run-level dataclass at its top; models declare their `Config`.
`parse` adds two things argparse-dataclass lacks: repeated list flags accumulate
(`--sr A --sr B` == `--sr A B`) and `-h` can print a second (model) parser's help too.
"""

import argparse
import ast
import contextlib
import dataclasses
import difflib
import importlib.util
import math
import os
import re
import shlex
import shutil
import sys
import sysconfig
import textwrap
from pathlib import Path

import torch
from argparse_dataclass import ArgumentParser

from sr_lib.errors import UsageError


def _merge_repeated(cls, argv: list[str], flags: list[str] = ()) -> list[str]:
    """Merge repeated occurrences of nargs='+' flags into one occurrence, also where one is
    abbreviated as argparse takes it (`--data A --dat B`: the start of one flag of `flags`, the
    parser's, alone); left apart, argparse kept the last occurrence only, dropping A silently."""
    list_flags = {
        "--" + f.name.replace("_", "-")
        for f in dataclasses.fields(cls)
        if f.metadata.get("nargs") in ("+", "*")
    }
    merged: dict[str, list[str]] = {}
    rest: list[str] = []
    current = None
    for a in argv:
        flag = _spelled_out(a.split("=", 1)[0], flags)
        if flag in list_flags:
            current = flag
            merged.setdefault(flag, [])
            if "=" in a:
                merged[flag].append(a.split("=", 1)[1])
            continue
        if current is not None and (not a.startswith("-") or a == "-" or _is_number(a)):
            merged[current].append(a)  # "-", a negative number: a value, refused by its check
            continue
        current = None
        rest.append(a)
    out = list(rest)
    for flag, values in merged.items():
        if len(values) == 1:  # `--sr=-run1`: a value starting with "-" stays argparse's value
            out.append(f"{flag}={values[0]}")
            continue
        for v in values:
            if v.startswith("-") and v != "-" and not _is_number(v):  # argparse's: a flag
                raise UsageError(f"{flag} {' '.join(values)}: {v} starts with '-'; give it as "
                                 f"./{v}, or alone as {flag}={v}")  # fmt: skip
        out += [flag, *values]
    return out


def _spelled_out(flag: str, flags: list[str]) -> str:
    """The flag of `flags` that `flag` abbreviates as argparse reads it (the start of that one
    flag alone, after "--"), else `flag` as it is."""
    if flag in flags or not flag.startswith("--") or len(flag) <= 2:
        return flag
    starting = [f for f in flags if f.startswith(flag)]
    return starting[0] if len(starting) == 1 else flag


def _is_number(text: str) -> bool:
    """Whether `text` reads as a number (-1, -0.5, -inf): a value, not a flag, as argparse takes
    it (no srspace flag looks like a negative number)."""
    try:
        float(text)
    except ValueError:
        return False
    return True


# Switches on by default that take no `--X` form: another flag of the same command line has
# that name. NCSR's --no-lr-noise (no noise on its LR) beside sr_train.py's run flag
# --lr-noise SIGMA (the LR noise of the degradations): the run flags are read first, so its
# `--lr-noise` was the run flag's ("expected one argument" after --no-lr-noise, as -h showed it).
NO_POSITIVE_FORM = frozenset({"--no-lr-noise"})


class WholeWordsHelp(argparse.HelpFormatter):
    """argparse's -h layout, its lines broken at spaces alone. argparse wraps with textwrap's
    defaults, which break after a hyphen, inside a flag (`--save-` / `uncertainty`) or a word
    (`super-` / `resolved`), that then cannot be searched for or copied from the screen; a word
    longer than the line stays whole, past its end."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(_one_spaced(text), width, break_on_hyphens=False,
                             break_long_words=False)  # fmt: skip

    def _fill_text(self, text: str, width: int, indent: str) -> str:  # (the epilog)
        return textwrap.fill(_one_spaced(text), width, initial_indent=indent,
                             subsequent_indent=indent, break_on_hyphens=False,
                             break_long_words=False)  # fmt: skip


def _one_spaced(text: str) -> str:
    """Runs of ASCII white space as one space, as argparse's formatter takes a help text."""
    return re.sub(r"\s+", " ", text, flags=re.ASCII).strip()


class OneLineParser(ArgumentParser):
    """argparse-dataclass's parser whose errors are one line (a UsageError: `prog: error: ...`,
    exit code 2) instead of the whole usage block followed by the error. An unknown flag's line
    names the flags nearest to it in spelling, of this parser's and of `near`'s. Its -h never
    breaks a flag or a hyphenated word across lines (WholeWordsHelp)."""

    near: tuple[str, ...] = ()

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", WholeWordsHelp)
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs):
        """A switch on by default (argparse-dataclass's `--no-X` alone, store_false) takes `--X`
        too, for a command line built from variables (`--requeue`): the same field, so the
        last of the two given wins, as argparse takes any repeated flag. -h lists it after
        `--no-X`, whose help says what that does (docs/design.md). Not those of
        NO_POSITIVE_FORM. So does a `no_X` field off by default (sr_eval.py's --no-lpips, a
        store_true `--no-X`): its `--X` stores False."""
        action = super().add_argument(*args, **kwargs)
        store = kwargs.get("action")
        switch = store in ("store_false", "store_true") and [a[:5] for a in args] == ["--no-"]
        if switch and args[0] not in NO_POSITIVE_FORM:
            shown = f"the default; undoes a {args[0]} given before it"
            other = "store_true" if store == "store_false" else "store_false"
            super().add_argument("--" + args[0][5:], action=other, dest=action.dest,
                                 default=action.default,
                                 help=argparse.SUPPRESS if action.help == argparse.SUPPRESS
                                 else shown)  # fmt: skip
        return action

    def error(self, message: str):
        message = " ".join(message.split())
        if message.startswith("unrecognized arguments: "):
            message += nearest_flags(message.split(": ", 1)[1], [*option_strings(self), *self.near])
        if argument := re.fullmatch(r"argument (\S+): (.*)", message):
            if said := self.flag_error(*argument.groups()):
                raise UsageError(said)
            message = re.sub(r"\bargument (\S+)", r"\1", message)
        raise UsageError(f"{message}; see {self.prog} -h")

    def flag_error(self, flags: str, text: str) -> str:
        """argparse's error of a bad value, `argument --n: invalid int value: 'x'`, in the
        house form of the scripts' own (docs/design.md "Errors"): the flag and the value as
        typed, then what it must be: `--n x: must be an integer`, `--scale 5: choose one of 2,
        3, 4, 8`; an argparse type's ArgumentTypeError (`'0': must be ...`) says its own. ""
        for the others (a value missing: argparse's words, with the -h to read)."""
        flag = next((f for f in flags.split("/") if f.startswith("--")), flags.split("/")[0])
        choices = [a.choices for a in self._actions if flag in a.option_strings and a.choices]
        if choice := re.fullmatch(r"invalid choice: (.*?) \(choose from .*\)", text):
            value, listed = typed(choice[1]), [str(c) for c in choices[0]] if choices else []
            return (f"{flag} {shown(value)}: choose one of {', '.join(listed)}"
                    f"{nearest_choice(value, listed)}")  # fmt: skip
        if kind := re.fullmatch(r"invalid (\w+) value: (.*)", text):
            what = {"int": "an integer", "float": "a number"}.get(kind[1], f"a {kind[1]}")
            return f"{flag} {shown(typed(kind[2]))}: must be {what}"
        if own := re.fullmatch(r"""('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"): (.*)""", text):
            return f"{flag} {shown(typed(own[1]))}: {own[2]}"
        return ""


def typed(text: str) -> str:
    """A value as argparse's error quotes it (its repr: 'x', or 5 for an int choice), as typed."""
    try:
        return str(ast.literal_eval(text))
    except (ValueError, SyntaxError):
        return text


def shown(value: str) -> str:
    """A value as an error line shows it: as typed, quoted for a shell where it must be (`'a
    b'`), one not printable (a newline) in bash's $'...' form, so that the line stays one line
    (paths: sr_lib.data.shell_quote, which imports this module)."""
    if value.isprintable():
        return shlex.quote(value)
    return "$'" + value.encode("unicode_escape").decode("ascii").replace("'", "\\'") + "'"


def nearest_flags(unknown: str, flags: list[str]) -> str:
    """ " (did you mean --steps?)" for the flags of `unknown` (argparse's list of unrecognized
    arguments, values too) that are near one of `flags` in spelling (a typo: --stpes, --sede),
    else ""."""
    near = []
    for word in unknown.split():
        flag = word.split("=", 1)[0]
        if flag.startswith("--") and flag not in flags:
            near += difflib.get_close_matches(flag, flags, n=1, cutoff=0.75)
    return f" (did you mean {' or '.join(dict.fromkeys(near))}?)" if near else ""


def nearest_choice(value: str, choices: list[str]) -> str:
    """ " (did you mean edsr?)" where `value`, not one of `choices`, is near one in spelling (a
    typo: edsrr, srflowda), else ""."""
    near = difflib.get_close_matches(value, choices, n=1)
    return f" (did you mean {near[0]}?)" if near else ""


def parse(
    cls, argv: list[str] | None, prog: str, known: bool = False, add_help: bool = True, near=None
):
    """Parse argv into dataclass `cls`. With known=True returns (instance, remaining argv).
    `near`: another dataclass whose flags an unknown flag's line may name too (sr_train.py's run
    flags, parsed before its model's)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = OneLineParser(cls, prog=prog, add_help=add_help)
    if near is not None:
        parser.near = tuple(option_strings(OneLineParser(near, prog=prog)))
    if add_help:
        show_defaults(parser, cls)
    argv = _merge_repeated(cls, argv, option_strings(parser))
    if known:
        return parser.parse_known_args(argv)
    return parser.parse_args(argv)


def option_strings(parser: argparse.ArgumentParser) -> list[str]:
    """Every flag `parser` takes (-h, --help included where it has them)."""
    return [s for action in parser._actions for s in action.option_strings]


def asks_json(cls, argv: list[str], prog: str) -> bool:
    """Whether argv asks for --json as argparse reads it: --json itself, or a start of it that no
    other flag of dataclass `cls` starts with (argparse's abbreviations: `--js`), before a `--`.
    For a command line that cannot be parsed, whose error line is still followed by the --json
    line a pipeline reads."""
    parser = OneLineParser(cls, prog=prog)
    flags = option_strings(parser)
    for a in argv:
        if a == "--":  # (the rest are values)
            break
        flag = a.split("=", 1)[0]
        if flag == "--json":
            return True
        abbrev = parser.allow_abbrev and flag.startswith("--") and len(flag) > 2
        if abbrev and [f for f in flags if f.startswith(flag)] == ["--json"]:
            return True
    return False


def refuse_stdio(args, names: tuple[str, ...]) -> None:
    """`-` given to one of these file or folder flags is one line (exit 2): it is no standard
    input or output here (the files are images, checkpoints, arrays, or a folder of them), and a
    folder or file named `-` is seldom what was meant (`sr_eval.py --out -` is standard output)."""
    for name in names:
        value = getattr(args, name)
        if value == "-" or (isinstance(value, list) and "-" in value):
            flag = "--" + name.replace("_", "-")
            raise UsageError(f"{flag} -: standard input or output cannot be used here; give "
                             "a file or folder (./- for one named '-')")  # fmt: skip


_UNSET = object()


def given_fields(cls, argv: list[str], prog: str) -> set[str]:
    """The fields of dataclass `cls` that argv sets, however written (--flag=value, --no-flag,
    an abbreviated --flag): argv parsed once more with every default replaced by a marker. A value
    equal to the default counts as given (`--seed 0`)."""
    parser = OneLineParser(cls, prog=prog, add_help=False)
    parser.set_defaults(**{a.dest: _UNSET for a in parser._actions})
    # argparse's own parse, not argparse-dataclass's (which builds the dataclass from the values)
    argv = _merge_repeated(cls, argv, option_strings(parser))
    namespace, _ = argparse.ArgumentParser.parse_known_args(parser, argv)
    return {k for k, v in vars(namespace).items() if v is not _UNSET}


def pick_device(name: str) -> torch.device:
    """`auto` -> cuda if available, else cpu; an unavailable cuda request (no CUDA, or cuda:N
    of a GPU this machine has not), or another kind of device, is a usage error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available here; use --device cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UsageError(f"--device {name}: {e}") from None
    if device.type not in ("cpu", "cuda"):  # (mps, meta, ...: a traceback in the first step)
        raise UsageError(f"--device {name}: srspace runs on cpu or cuda, not {device.type}")
    count = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.type == "cuda" and (device.index or 0) >= count:  # (else an error at first use)
        raise UsageError(f"--device {name}: this machine has {count} CUDA device(s), cuda:0 "
                         f"to cuda:{count - 1} (as CUDA_VISIBLE_DEVICES shows them); give one "
                         "of them")  # fmt: skip
    return device


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # --amp of sr_train and sr_sample


def autocast_for(amp: str, device: torch.device):
    """--amp: bfloat16 or float16 autocast on the device, or no autocast ("none")."""
    dtype = AMP_DTYPES.get(amp)
    return torch.autocast(device.type, dtype) if dtype else contextlib.nullcontext()


def cpu_has_native(amp: str) -> bool:
    """Whether oneDNN runs --amp's dtype natively on this CPU (bf16: AVX512-BF16 or AMX; fp16:
    AVX512-FP16 or AMX-FP16); elsewhere it is emulated, slower than float32 (README, `--amp`)."""
    probe = {"bf16": "_is_mkldnn_bf16_supported", "fp16": "_is_mkldnn_fp16_supported"}[amp]
    try:
        return bool(getattr(torch.ops.mkldnn, probe)())  # private; no public API yet
    except (AttributeError, RuntimeError):
        return False


def amp_emulated(amp: str, device: torch.device) -> str | None:
    """Why --amp's dtype would run emulated on `device`, slower than float32, and what to do; or
    None: a CPU without AVX512-BF16/AMX (bf16) or AVX512-FP16/AMX-FP16 (fp16); a GPU older than
    Ampere (compute capability 8) for bf16, which torch accepts and emulates."""
    if amp == "none":
        return None
    if device.type == "cpu" and not cpu_has_native(amp):
        return f"this CPU emulates {amp}, slower than float32; drop --amp"
    if device.type == "cuda" and amp == "bf16":
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            return (f"this GPU (compute capability {major}.{minor}) emulates bf16, slower than "
                    "float32; use --amp fp16 where the model allows it, or drop --amp")  # fmt: skip
    return None


def compile_blocker(device: torch.device) -> str | None:
    """Why torch.compile's inductor could not build its kernels for `device` here, or None.

    It compiles C++ for a CPU (with $CXX or g++) and, through Triton, a C launcher for a GPU
    ($CC, gcc or clang), both against Python's headers. Without them the first training step
    fails with a traceback of a hundred lines; this is asked before the run starts."""
    include = {sysconfig.get_paths()["include"]}
    if "posix_prefix" in sysconfig.get_scheme_names():  # Triton's choice on Debian's Python
        include.add(sysconfig.get_paths(scheme="posix_prefix")["include"])
    # (Linux only: a system Python without its -dev package; a macOS framework Python keeps its
    # headers where inductor looks further.)
    if sys.platform.startswith("linux") and not any((Path(d) / "Python.h").is_file()
                                                    for d in include):  # fmt: skip
        return f"Python's C headers (Python.h) are not installed (looked in {min(include)})"
    if device.type == "cpu":
        try:
            from torch._inductor.cpp_builder import get_cpp_compiler
        except ImportError:  # moved in another torch version: compile reports it itself
            return None
        try:
            get_cpp_compiler()
        except Exception:  # inductor's InvalidCxxCompiler
            cxx = os.environ.get("CXX", "g++")
            return f"no working C++ compiler ({cxx}): install g++, or name another in CXX"
    elif device.type == "cuda":
        if importlib.util.find_spec("triton") is None:
            return "Triton is not installed (it comes with PyTorch's Linux CUDA wheels)"
        if not (os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")):
            return "no C compiler for Triton (gcc or clang; or set CC)"
    return None


def _interval(spec: str) -> tuple[float, float, bool, bool]:
    """An interval such as [1, inf) -> (1, inf, low included, high included)."""
    low, high = (float(x) for x in spec[1:-1].split(","))
    return low, high, spec[0] == "[", spec[-1] == "]"


def _number(x: float) -> str:
    """A bound in words: 1.0 -> "1", 4294967295.0 -> "4294967295", 0.5 -> "0.5"."""
    return str(int(x)) if math.isfinite(x) and x == int(x) else f"{x:g}"


def _describe(spec: str) -> str:
    """An interval in words: [0, 1] -> "between 0 and 1", [1, inf) -> ">= 1", (0, inf) -> "> 0"."""
    low, high, low_in, high_in = _interval(spec)
    if low_in and high_in and math.isfinite(low) and math.isfinite(high):
        return f"between {_number(low)} and {_number(high)}"
    parts = []
    if math.isfinite(low):
        parts.append(f"{'>=' if low_in else '>'} {_number(low)}")
    if math.isfinite(high):
        parts.append(f"{'<=' if high_in else '<'} {_number(high)}")
    return " and ".join(parts)


def config_flag(name: str, value=_UNSET, shown: str | None = None) -> str:
    """A model Config field named for both of its users, once in a message: sr_train.py's flag
    and the key a Python caller gives build_model, each with the value as it writes it:
    "--flow-levels 9 (flow_levels=9)", a switch "--lu (lu=True)", no value "--nb (nb)".
    `shown`: the value as the flag's text, where it is not str(value)."""
    flag = "--" + name.replace("_", "-")
    if value is _UNSET:
        return f"{flag} ({name})"
    text = flag if value is True else f"{flag} {value if shown is None else shown}"
    return f"{text} ({name}={value!r})"


def check_ranges(obj, python: bool = False) -> None:
    """Every number of a flat dataclass (run flags, a model's Config) inside the interval of its
    field's `range` metadata, e.g. "[0, 1]" or "(0, inf)", and finite; without one an int must be
    >= 1 and a float >= 0. A list of numbers is checked item by item; None (unset) passes. The
    first violation is a one-line UsageError naming the flag, as argparse reports a bad choice;
    python=True (a model's Config as build_model builds it) names its key too (`config_flag`)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        values = value if isinstance(value, (list, tuple)) else [value]
        numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if not numbers:
            continue
        real = "float" in str(f.type)
        spec = f.metadata.get("range") or ("[0, inf)" if real else "[1, inf)")
        low, high, low_in, high_in = _interval(spec)
        for v in numbers:
            inside = (v >= low if low_in else v > low) and (v <= high if high_in else v < high)
            if not (math.isfinite(v) and inside):
                kind = "a number" if real else "an integer"
                kind = kind if math.isfinite(v) else "a finite number"
                shown = " ".join(map(str, numbers)) if len(values) > 1 else str(v)
                named = f"--{f.name.replace('_', '-')} {shown}"
                if python:
                    named = config_flag(f.name, value if len(values) > 1 else v, shown)
                raise UsageError(f"{named}: must be {kind} {_describe(spec)}")


def help_parser(
    cls, prog: str, epilog: str | None = None, hide: tuple[str, ...] = (), add_help: bool = True
) -> ArgumentParser:
    """A parser of dataclass `cls` for -h, its defaults shown (`show_defaults`). The fields in
    `hide` are left out (a model's `scale`, which is the run's --scale); add_help=False leaves
    out -h itself (a second section)."""
    parser = OneLineParser(cls, prog=prog, epilog=epilog, add_help=add_help)
    for action in parser._actions:  # argparse keeps no public list of its actions
        if action.dest in hide:
            action.help = argparse.SUPPRESS
    show_defaults(parser, cls)
    return parser


def show_defaults(parser: argparse.ArgumentParser, cls) -> None:
    """Each flag's help ends with its default, unless the default is unset (None) or empty, the
    flag is a switch (its help says what it does) or hidden, or the help mentions the default
    already. A float as it would be typed: 2.3094, not 2.3094010767585034; 0, not 0.0."""
    defaults = {
        f.name: f.default_factory() if f.default is dataclasses.MISSING else f.default
        for f in dataclasses.fields(cls)
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    }
    for action in parser._actions:
        default = defaults.get(action.dest)
        text = action.help or ""
        if default in (None, "", []) or action.nargs == 0 or "default" in text:
            continue
        if text == argparse.SUPPRESS:
            continue
        values = default if isinstance(default, list) else [default]
        shown = " ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)
        action.help = f"{text} (default: {shown})" if text else f"default: {shown}"
