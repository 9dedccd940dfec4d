"""Flows under bfloat16 autocast (CPU): the flow's state and prior stay float32, the frozen encoder
is cast once instead of at every step, and what runs in bfloat16 gives the numbers autocast
gives. The bfloat16 learning curves: tests/bench/bench_flow_amp.py (docs/benchmarks.md)."""

import pytest
import torch
from conftest import TINY
from torch.utils._python_dispatch import TorchDispatchMode

from sr_lib.models import build_model
from sr_lib.models.flow_layers import InvConv1x1, Split

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


class Casts(TorchDispatchMode):
    """Records the input of every dtype conversion (aten._to_copy) dispatched inside it."""

    def __init__(self):
        super().__init__()
        self.inputs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default:
            self.inputs.append(args[0])
        return func(*args, **(kwargs or {}))


def flow(name="srflow"):
    model = build_model(name, {**TINY[name], "scale": 4}).train()
    lr, hr = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 32, 32)
    model.on_step(0, 10)  # the encoder frozen, as in the first half of training
    model(lr, hr)  # ActNorm's data-dependent initialisation
    return model, lr, hr


@pytest.mark.parametrize("name", ["srflow", "ncsr"])
def test_frozen_encoder_is_cast_once_with_the_same_features(name):
    model, lr, hr = flow(name)
    with torch.autocast(**BF16):
        reference = model.RRDB.features(lr, model.blocks, up_to=model.up_to)  # autocast's casts
        model(lr, hr)["loss"].backward()  # builds the bfloat16 copy
        copy = model.encoder(lr)
        with Casts() as casts:
            model(lr, hr)["loss"].backward()
        features = copy.features(lr, model.blocks, up_to=model.up_to)
        assert copy is not model.RRDB and model.encoder(lr) is copy  # kept between steps
    weights = {p.data_ptr() for p in model.RRDB.parameters()}
    assert not [t for t in casts.inputs if t.data_ptr() in weights]  # no encoder weight cast
    assert model.encoder(lr) is model.RRDB  # without autocast: the float32 encoder
    assert all(torch.equal(reference[k], features[k]) for k in reference)  # bit-identical
    assert not any(p.requires_grad for p in copy.parameters())
    assert "encoder" not in "".join(model.state_dict())  # never saved

    with torch.no_grad():  # a changed weight (a load, --rrdb-init) makes a new copy
        model.RRDB.conv_first.weight.mul_(2)
    with torch.autocast(**BF16):
        fresh = model.encoder(lr)
        out = fresh.features(lr, model.blocks, up_to=model.up_to)
        want = model.RRDB.features(lr, model.blocks, up_to=model.up_to)
    assert fresh is not copy and all(torch.equal(want[k], out[k]) for k in want)
    model.on_step(9, 10)  # unfrozen: the encoder trains, autocast casts its weights as usual
    with torch.autocast(**BF16):
        assert model.encoder(lr) is model.RRDB and not model._low_encoder  # copy released


def test_the_frozen_encoders_copy_keeps_a_channels_last_layout():
    """A channels-last model (bench_gpu.py's bf16_channels_last) gets a channels-last copy: a
    contiguous one would have every encoder convolution convert its input's layout."""
    model, lr, _ = flow()
    model = model.to(memory_format=torch.channels_last)
    lr = lr.contiguous(memory_format=torch.channels_last)
    with torch.autocast(**BF16):
        want = model.RRDB.features(lr, model.blocks, up_to=model.up_to)
        copy = model.encoder(lr)
        got = copy.features(lr, model.blocks, up_to=model.up_to)
    assert copy is not model.RRDB
    weights = [p for p in copy.parameters() if p.ndim == 4 and min(p.shape[:2]) > 1]
    assert weights and all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_flow_state_and_prior_stay_float32_under_autocast():
    model, lr, hr = flow()
    calls = []
    hooks = [
        m.register_forward_hook(lambda m, args, out: calls.append((m, args[0], out)))
        for m in model.modules()
        if isinstance(m, InvConv1x1 | Split)
    ]
    with torch.autocast(**BF16):
        latents, logdet = model.encode(lr, hr)
    for h in hooks:
        h.remove()
    assert all(z.dtype == torch.float32 for z in latents) and logdet.dtype == torch.float32
    assert {type(m) for m, _, _ in calls} == {InvConv1x1, Split}
    for m, x, out in calls:  # computed in float32: the numbers of the same call without autocast
        i = 1 if isinstance(m, Split) else 0  # Split: (z1, eps, logdet); InvConv1x1: (y, logdet)
        assert out[i].dtype == torch.float32 and torch.equal(out[i], m(x)[i])


def test_a_bf16_step_casts_fewer_tensors_than_autocast_alone_would():
    """The casts left in a frozen-encoder step are those of trainable weights, their gradients and
    the coupling networks' inputs: none of the encoder, InvConv or split priors."""
    model, lr, hr = flow()
    with torch.autocast(**BF16):
        model(lr, hr)["loss"].backward()
    with Casts() as casts, torch.autocast(**BF16):
        model(lr, hr)["loss"].backward()
    frozen = {p.data_ptr() for p in model.RRDB.parameters()}
    square_1x1 = {m.weight.data_ptr() for m in model.modules() if isinstance(m, InvConv1x1)}
    prior = {p.data_ptr() for m in model.modules() if isinstance(m, Split) for p in m.parameters()}
    ptrs = {t.data_ptr() for t in casts.inputs}
    assert casts.inputs and not ptrs & (frozen | square_1x1 | prior)
