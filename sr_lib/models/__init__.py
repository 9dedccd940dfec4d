"""All models, by name, and how to build or load one. One dict: a name you can grep for beats a
string registry."""

import os
from dataclasses import fields

from sr_lib import __version__
from sr_lib.checkpoint import is_srspace_checkpoint, load_checkpoint, load_checkpoint_hashed
from sr_lib.errors import CheckpointError, UsageError
from sr_lib.models.base import SRModel
from sr_lib.models.bicubic import Bicubic
from sr_lib.models.edsr import EDSR
from sr_lib.models.refvae import RefVAE
from sr_lib.models.rrdb import RRDB
from sr_lib.models.srflow import SRFlow
from sr_lib.models.srflow_variants import NCSR, SRFlowDA
from sr_lib.models.varsr import VarSR
from sr_lib.models.vspsr import VSpSR
from sr_lib.weights import as_state_dict

MODELS: dict[str, type[SRModel]] = {
    "bicubic": Bicubic,
    "edsr": EDSR,
    "rrdb": RRDB,
    "srflow": SRFlow,
    "srflow_da": SRFlowDA,
    "ncsr": NCSR,
    "vspsr": VSpSR,
    "refvae": RefVAE,
    "varsr": VarSR,
}


def build_model(name: str, cfg: dict | None = None) -> SRModel:
    """Build MODELS[name] from a (possibly partial) config dict; unknown keys fail loudly."""
    if name not in MODELS:
        raise UsageError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    cls = MODELS[name]
    known = {f.name for f in fields(cls.Config)}
    unknown = set(cfg or {}) - known
    if unknown:
        raise UsageError(f"model {name}: unknown config keys {sorted(unknown)}")
    return cls(cls.Config(**(cfg or {})))


def read_checkpoint(path: str | os.PathLike) -> dict:
    """A checkpoint file; one of a model's formats older than its `oldest_checkpoint_format` is
    refused (a one-line CheckpointError: retrain)."""
    return load_checkpoint(path, oldest_formats())


def read_checkpoint_hashed(path: str | os.PathLike) -> tuple[dict, str]:
    """(read_checkpoint(path), the file's sha256) from one open of it."""
    return load_checkpoint_hashed(path, oldest_formats())


def oldest_formats() -> dict[str, int]:
    return {k: c.oldest_checkpoint_format for k, c in MODELS.items()}


def checkpoint_config(ck: dict, path: str | os.PathLike) -> dict:
    """The model config of srspace checkpoint `ck`, which this srspace can build: a model or config
    fields it does not know (a checkpoint of a newer srspace) are a one-line CheckpointError
    naming the file, not a usage error about flags the user never gave."""
    made_by = f"written by srspace {ck.get('version', '?')}; this is srspace {__version__}"
    if ck["model"] not in MODELS:
        raise CheckpointError(
            f"{path}: holds a model {ck['model']!r} this srspace does not know ({made_by}); "
            "upgrade srspace to load it"
        )
    known = {f.name for f in fields(MODELS[ck["model"]].Config)}
    unknown = sorted(set(ck["model_cfg"]) - known)
    if unknown:
        raise CheckpointError(
            f"{path}: its {ck['model']} config has fields this srspace does not know {unknown} "
            f"({made_by}); upgrade srspace to load it"
        )
    return ck["model_cfg"]


def load_model(
    path,
    device="cpu",
    model: str | None = None,
    scale: int | None = None,
    raw_weights=False,
    global_skip: str | None = None,
    ck: dict | None = None,
):
    """Build the model a checkpoint describes and load its weights strictly: the moving average
    of the weights when the run kept one (`sr_train.py --ema`), else (or with `raw_weights`) the
    weights as trained. `ck`: the file as `read_checkpoint(path)` returns it, where the caller
    has read it already (sr_sample.py, with its sha256: `read_checkpoint_hashed`).

    Returns (model in eval mode, checkpoint dict). For a raw state_dict (no srspace metadata),
    `model` and `scale` are required; the model class reads its config off the keys
    (`raw_config`) and maps them (`load_raw_state_dict`). `global_skip`: the global skip of a
    raw rrdb file where its keys do not tell ("esrgan" or "srflow", sr_sample.py --global-skip).
    """
    ck = read_checkpoint(path) if ck is None else ck
    if is_srspace_checkpoint(ck):
        own = ck["model_cfg"].get("global_skip", "srflow") if ck["model"] == "rrdb" else None
        # (its config says which; a flag must not contradict it)
        if global_skip is not None and global_skip != own:
            what = f"an rrdb with the {own} skip" if own else f"model {ck['model']!r}"
            raise CheckpointError(
                f"{path}: holds {what}, not --global-skip {global_skip}: drop --global-skip"
            )
        if model is not None and model != ck["model"]:
            raise CheckpointError(f"{path}: holds model {ck['model']!r}, not {model!r}")
        if scale is not None and int(scale) != int(ck["model_cfg"].get("scale", scale)):
            raise CheckpointError(
                f"{path}: holds a x{ck['model_cfg']['scale']} model, not x{scale}"
            )
        net = build_model(ck["model"], checkpoint_config(ck, path))
        averaged = "ema_state_dict" in ck and not raw_weights
        net.load_weights(ck["ema_state_dict" if averaged else "state_dict"], path)
    else:
        if model is None or scale is None:
            # Named for both callers: sr_sample.py's flags, load_model's arguments.
            raise CheckpointError(
                f"{path}: a raw state_dict without srspace metadata; pass --model and --scale "
                "(load_model(path, model=..., scale=...))"
            )
        if model not in MODELS:  # (sr_sample.py's --model has these choices: the library's)
            raise UsageError(f"model={model!r}: unknown model; choose one of: {', '.join(MODELS)}")
        if global_skip is not None and model != "rrdb":
            raise UsageError(
                f"--global-skip {global_skip} (global_skip=): only for --model rrdb, not {model}"
            )
        sd = as_state_dict(ck, path)  # (the file as read above)
        try:
            extra = {"global_skip": global_skip} if global_skip is not None else {}
            cfg = MODELS[model].raw_config(sd, int(scale), **extra)
        except CheckpointError as e:  # (raw_config has no path to name)
            raise CheckpointError(f"{path}: {e}") from None
        net = build_model(model, cfg)
        net.load_raw_state_dict(sd, path)
        ck = {"model": model, "model_cfg": cfg, "state_dict": sd, "step": 0}
    return net.to(device).eval(), ck
