"""Checkpoint files: one self-describing dict, written atomically, loaded with weights_only=True.

{"format": 2, "version": str, "torch": str (the torch that wrote it), "model": name,
 "model_cfg": {...}, "state_dict": {...}, "step": int, "train_args": {...}, ...training state
 (optimizers, RNG states, counters)}
Only primitives and tensors go in, so `torch.load(weights_only=True)` reads it and a file that
carries pickled code is refused. This module knows the file format only; building the model a
checkpoint describes is `sr_lib.models.load_model`.
"""

import errno
import os
from pathlib import Path

import torch

from sr_lib import __version__
from sr_lib.data import shell_quote, write_target
from sr_lib.errors import CheckpointError, OutputError
from sr_lib.weights import read_hashed, torch_load

# 2: the flows condition on the post-activation RRDB maps and NCSR x8 stacks blocks 1,8,15,22,
#    as the released code does; a format-1 flow checkpoint computes another function.
FORMAT = 2


def save_checkpoint(path: str | os.PathLike, payload: dict) -> None:
    """Write atomically: temp file in the same folder, fsync, rename (never a half-written file);
    where `path` is a symbolic link, in its target's folder and over its target (`write_target`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    real = write_target(path)  # a link (onto another disk) stays: its target is replaced
    tmp = real.with_name(f".{real.name}.tmp{os.getpid()}")
    # The versions first: a torch too old to load the file still reads them (weights.written_by)
    payload = {"format": FORMAT, "version": __version__, "torch": str(torch.__version__), **payload}
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, real)
    except BaseException as e:  # a full disk, a signal: the previous checkpoint stays intact
        tmp.unlink(missing_ok=True)
        # torch.save reports a failed write as a RuntimeError with the OSError as its context
        cause = e if isinstance(e, OSError) else e.__context__
        if isinstance(cause, OSError):
            # What to type: with another --out a resume needs this run's checkpoint by path
            # (--resume auto there starts a new run). A first best.pt or last.pt has none of its
            # own before it, but the run goes on from the other where it is there (--resume
            # auto: last.pt, else best.pt).
            held = [p for p in (path.with_name("last.pt"), path.with_name("best.pt"), path)
                    if p.is_file()]  # fmt: skip
            go_on = (": free space, then continue with --resume auto (or on another disk: --out "
                     f"NEW --resume {shell_quote(held[0])})" if held else "")  # fmt: skip
            kept = (
                f"the previous one is intact{go_on}" if path.is_file() else
                f"none was written before, {held[0].name} is intact{go_on}" if held else
                "none was written before: free space or give another --out, then start again"
            )  # fmt: skip
            raise OutputError(
                f"{path}: cannot write the checkpoint ({cause.strerror or cause}); {kept}"
            ) from None
        raise
    try:
        dir_fd = os.open(real.parent, os.O_RDONLY)
    except PermissionError:  # a folder this user may write but not read (0333, NFS root_squash)
        return  # (not syncable from here: the rename is as durable as the file system makes it)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    except OSError as e:  # (the file is in place: said, not a traceback)
        # A file system that cannot sync a folder (some FUSE and network ones): the rename is
        # as durable as it makes it. Any other error: the disk's.
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.ENOSYS):
            raise OutputError(
                f"{path}: written, but its folder cannot be synced to disk ({e.strerror or e}): "
                "it may not survive a crash of the machine; check the disk, then continue "
                "with --resume auto"
            ) from None
    finally:
        os.close(dir_fd)


def load_checkpoint(path: str | os.PathLike, oldest_format: dict[str, int] | None = None) -> dict:
    """Read a checkpoint dict; every failure is a one-line CheckpointError naming the file.

    A format newer than this srspace's is refused; so is a checkpoint of model M older than
    `oldest_format[M]` (the model's `oldest_checkpoint_format`: older weights compute another
    function; `sr_lib.models.read_checkpoint` passes them all).
    """
    return checked(torch_load(path, "checkpoint"), path, oldest_format)


def load_checkpoint_hashed(
    path: str | os.PathLike, oldest_format: dict[str, int] | None = None
) -> tuple[dict, str]:
    """(load_checkpoint(path, oldest_format), the file's sha256) from one open of it."""
    ck, sha256 = read_hashed(path, "checkpoint")
    return checked(ck, path, oldest_format), sha256


def checked(ck, path: str | os.PathLike, oldest_format: dict[str, int] | None) -> dict:
    """`ck`, loaded from file `path`, where it is a checkpoint this srspace reads."""
    path = Path(path)
    if not isinstance(ck, dict):
        raise CheckpointError(f"{path}: not a checkpoint (a {type(ck).__name__}, expected a dict)")
    if "format" in ck and int(ck["format"]) > FORMAT:
        raise CheckpointError(
            f"{path}: checkpoint format {ck['format']} is newer than this srspace "
            f"({__version__}, format {FORMAT}); upgrade srspace"
        )
    oldest = (oldest_format or {}).get(ck["model"], 1) if is_srspace_checkpoint(ck) else 1
    if is_srspace_checkpoint(ck) and int(ck["format"]) < oldest:
        raise CheckpointError(
            f"{path}: a checkpoint of {ck['model']} in format {ck['format']}, older than format "
            f"{oldest}: that {ck['model']} computes another function than the released code "
            "(docs/flows.md, checkpoint formats); it cannot be loaded, retrain it"
        )
    return ck


def is_srspace_checkpoint(ck: dict) -> bool:
    return "format" in ck and "model" in ck and "state_dict" in ck
