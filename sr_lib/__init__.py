"""srspace: learn, sample and evaluate the super-resolution space."""

__version__ = "0.2.0"


def refuse_non_posix(prog: str, os_name: str | None = None) -> None:
    """The scripts need a POSIX system: fcntl's file locks, SIGUSR1 and SIGHUP (SLURM's
    preemption), select.poll. Elsewhere (Windows) they would stop at import with a traceback;
    this is their one line and exit 2 instead, called before those imports. (This file imports
    nothing: it must run anywhere.)"""
    import os
    import sys

    name = os.name if os_name is None else os_name
    if name != "posix":
        print(f"{prog}: error: srspace runs on Linux and macOS (POSIX): this system is not "
              f"(os.name {name!r}); on Windows use WSL 2", file=sys.stderr)  # fmt: skip
        raise SystemExit(2)
