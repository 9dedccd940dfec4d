"""Checkpoints: one self-describing dict, written atomically, loaded with weights_only=True.

{"format": 2, "model": name, "model_cfg": {...}, "state_dict": {...}, "step": int,
 "train_args": {...}, "version": str, ...training state (optimizers, RNG states, counters)}
Only primitives and tensors go in, so `torch.load(weights_only=True)` reads it and a file that
carries pickled code is refused. A raw state_dict (e.g. an official release) needs --model/--scale.
"""

import os
from pathlib import Path

import torch

from sr_lib import __version__
from sr_lib.errors import CheckpointError, OutputError
from sr_lib.models import MODELS, build_model
from sr_lib.weights import load_state_dict, load_strict, torch_load

# 2: the flows condition on the post-activation RRDB maps and NCSR x8 stacks blocks 1,8,15,22,
#    as the released code does; a format-1 flow checkpoint computes another function.
FORMAT = 2


def save_checkpoint(path: str | os.PathLike, payload: dict) -> None:
    """Write atomically: temp file in the same folder, fsync, rename (never a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    payload = {"format": FORMAT, "version": __version__, **payload}
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # a full disk, a signal: the previous checkpoint stays intact
        tmp.unlink(missing_ok=True)
        # torch.save reports a failed write as a RuntimeError with the OSError as its context
        cause = e if isinstance(e, OSError) else e.__context__
        if isinstance(cause, OSError):
            raise OutputError(
                f"{path}: cannot write the checkpoint ({cause.strerror or cause}); the previous "
                "one is intact: free space or use another --out, then --resume"
            ) from None
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint dict; every failure is a one-line CheckpointError naming the file."""
    path = Path(path)
    ck = torch_load(path, "checkpoint")
    if not isinstance(ck, dict):
        raise CheckpointError(f"{path}: not a checkpoint (a {type(ck).__name__}, expected a dict)")
    if "format" in ck and int(ck["format"]) > FORMAT:
        raise CheckpointError(
            f"{path}: checkpoint format {ck['format']} is newer than this srspace "
            f"({__version__}, format {FORMAT}); upgrade srspace"
        )
    if is_srspace_checkpoint(ck) and ck["model"] in MODELS:
        oldest = MODELS[ck["model"]].oldest_checkpoint_format
        if int(ck["format"]) < oldest:
            raise CheckpointError(
                f"{path}: a {ck['model']} checkpoint of format {ck['format']}, older than format "
                f"{oldest}: that {ck['model']} computes another function than the released code "
                "(docs/flows.md, checkpoint formats); it cannot be loaded, retrain it"
            )
    return ck


def is_srspace_checkpoint(ck: dict) -> bool:
    return "format" in ck and "model" in ck and "state_dict" in ck


def load_model(path, device="cpu", model: str | None = None, scale: int | None = None):
    """Build the model a checkpoint describes and load its weights strictly.

    Returns (model in eval mode, checkpoint dict). For a raw state_dict (no srspace metadata),
    `model` and `scale` are required and the model class's `load_raw_state_dict` maps the keys.
    """
    ck = load_checkpoint(path)
    if is_srspace_checkpoint(ck):
        if model is not None and model != ck["model"]:
            raise CheckpointError(f"{path}: holds model {ck['model']!r}, not {model!r}")
        if scale is not None and int(scale) != int(ck["model_cfg"].get("scale", scale)):
            raise CheckpointError(
                f"{path}: holds a x{ck['model_cfg']['scale']} model, not x{scale}"
            )
        net = build_model(ck["model"], ck["model_cfg"])
        load_weights(net, ck["state_dict"], path)
    else:
        if model is None or scale is None:
            raise CheckpointError(
                f"{path}: a raw state_dict without srspace metadata; pass --model and --scale"
            )
        if model not in MODELS:
            raise CheckpointError(f"{path}: unknown --model {model!r}")
        sd = load_state_dict(path)
        cfg = MODELS[model].raw_config(sd, int(scale))
        net = build_model(model, cfg)
        if hasattr(net, "load_raw_state_dict"):
            net.load_raw_state_dict(sd, path)
        else:
            load_weights(net, sd, path)
        ck = {"model": model, "model_cfg": cfg, "state_dict": sd, "step": 0}
    return net.to(device).eval(), ck


def load_weights(net: torch.nn.Module, state_dict: dict, path) -> None:
    """Strict load_state_dict with a one-line summary of what does not match."""
    load_strict(net, state_dict, f"{path}: weights do not match the model")
