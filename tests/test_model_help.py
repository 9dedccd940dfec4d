"""The flows' help names what each released training code does (docs/flows.md): SRFlow's
(andreas128/SRFlow) and NCSR's (younggeun-kim/NCSR) never freeze the encoder and add no HR noise;
SRFlow-DA's (yhjo09/SRFlow-DA) freezes it for the first half (`set_rrdb_training(False)` at
start, trained after `train_RRDB_delay: 0.5`) and adds N(0, (4/√3)/255) to the HR."""

import re
from dataclasses import fields

import pytest

from sr_lib.models import MODELS

RELEASED = {  # model: (--freeze-encoder, --dequant) of its released training code
    "srflow": ("0", "none"),
    "srflow_da": ("0.5", "gaussian"),
    "ncsr": ("0", "none"),
}


def released_value(model: str, name: str) -> str:
    (f,) = [f for f in fields(MODELS[model].Config) if f.name == name]
    m = re.search(r"released code: ([\w.]+)", f.metadata["help"])
    assert m, f"{model} --{name.replace('_', '-')}: {f.metadata['help']!r} names no released value"
    return m[1]


@pytest.mark.parametrize("model", RELEASED)
def test_a_flows_help_names_its_own_released_codes_freeze_and_dequantisation(model):
    assert (released_value(model, "freeze_encoder"), released_value(model, "dequant")) == RELEASED[
        model
    ]


def test_srflow_da_defaults_are_its_released_codes():
    cfg = MODELS["srflow_da"].Config()
    assert (str(cfg.freeze_encoder), cfg.dequant) == RELEASED["srflow_da"]
