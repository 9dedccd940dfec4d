"""Command-line parsing shared by the three scripts (argparse-dataclass, flat dataclasses).

Each script declares its own run-level dataclass at its top; models declare their `Config`.
`parse` adds two things argparse-dataclass lacks: repeated list flags accumulate
(`--sr A --sr B` == `--sr A B`) and `-h` can print a second (model) parser's help too.
"""

import dataclasses
import sys

import torch
from argparse_dataclass import ArgumentParser

from sr_lib.errors import UsageError


def _merge_repeated(cls, argv: list[str]) -> list[str]:
    """Merge repeated occurrences of nargs='+' flags into one occurrence."""
    list_flags = {
        "--" + f.name.replace("_", "-")
        for f in dataclasses.fields(cls)
        if f.metadata.get("nargs") in ("+", "*")
    }
    merged: dict[str, list[str]] = {}
    rest: list[str] = []
    current = None
    for a in argv:
        flag = a.split("=", 1)[0]
        if flag in list_flags:
            current = flag
            merged.setdefault(flag, [])
            if "=" in a:
                merged[flag].append(a.split("=", 1)[1])
            continue
        if current is not None and not a.startswith("-"):
            merged[current].append(a)
            continue
        current = None
        rest.append(a)
    out = list(rest)
    for flag, values in merged.items():
        out += [flag, *values]
    return out


class _Parser(ArgumentParser):
    def error(self, message: str):
        """One line, as every other error (argparse prints the whole usage first), exit 2."""
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} -h)\n")


def parse(cls, argv: list[str] | None, prog: str, known: bool = False, add_help: bool = True):
    """Parse argv into dataclass `cls`. With known=True returns (instance, remaining argv)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _Parser(cls, prog=prog, add_help=add_help)
    argv = _merge_repeated(cls, argv)
    if known:
        return parser.parse_known_args(argv)
    return parser.parse_args(argv)


def pick_device(name: str) -> torch.device:
    """`auto` -> cuda if available, else cpu; an unavailable cuda request is a usage error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available here; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise UsageError(f"--device {name}: {e}") from None
