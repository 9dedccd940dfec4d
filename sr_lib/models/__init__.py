"""All models, by name. One dict: a name you can grep for beats a string registry."""

from dataclasses import fields

from sr_lib.errors import UsageError
from sr_lib.models.base import SRModel
from sr_lib.models.bicubic import Bicubic
from sr_lib.models.edsr import EDSR
from sr_lib.models.refvae import RefVAE
from sr_lib.models.rrdb import RRDB
from sr_lib.models.srflow import SRFlow
from sr_lib.models.srflow_variants import NCSR, SRFlowDA
from sr_lib.models.varsr import VarSR
from sr_lib.models.vspsr import VSpSR

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
