"""Exponential moving average of a model's weights: `sr_train.py --ema DECAY`.

After every applied training step, average ← decay · average + (1 − decay) · weights, over the
parameters and the floating-point buffers (ActNorm and BatchNorm statistics); integer and boolean
buffers (counters, flags) are copied. The first update copies the weights, so what the first step
sets up (ActNorm's data-dependent initialisation, weights loaded by `--rrdb-init`) is in the
average from its start. Polyak averaging as BasicSR, KAIR and neosr keep it; the averaged weights
usually validate better than the raw ones late in training and smooth the oscillations of GAN
training.

The average is a full copy of the model (`module`, always in eval mode): validation samples from
it directly, and checkpoints save its state_dict as `ema_state_dict` (the keys of `state_dict`),
which `sr_lib.models.load_model` loads unless asked for the raw weights.
"""

import copy

import torch
from torch import nn


class EMA:
    """The average of `model`'s weights; continued from checkpoint `resumed` if that holds one."""

    def __init__(self, model: nn.Module, decay: float, resumed: dict | None = None, path=""):
        self.decay = decay
        self.updates = 0  # applied steps averaged in so far
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        # Pairs (average, model) in state_dict order, built once: walking the module tree at every
        # step would cost host time on every step. The model's tensors must not be replaced after
        # this (load_state_dict and optimizers update them in place).
        ours, theirs = self.module.state_dict(keep_vars=True), model.state_dict(keep_vars=True)
        self._floats = ([], [])
        self._others = ([], [])
        for key, t in theirs.items():
            pairs = self._floats if t.is_floating_point() else self._others
            pairs[0].append(ours[key].detach())
            pairs[1].append(t.detach())
        if resumed is not None and "ema_state_dict" in resumed:  # (its decay: replaced by ours)
            self.module.load_weights(resumed["ema_state_dict"], f"{path} (ema_state_dict)")
            self.updates = int(resumed["ema_updates"])

    @torch.no_grad()
    def update(self) -> None:
        """Average in the model's current weights (called after each applied step)."""
        averages, weights = self._floats
        if averages and self.updates == 0:
            torch._foreach_copy_(averages, weights)
        elif averages:  # (a model without weights, e.g. bicubic, has nothing to average)
            torch._foreach_lerp_(averages, weights, 1.0 - self.decay)  # a + (1 − d)(w − a)
        for a, w in zip(*self._others):
            a.copy_(w)
        self.updates += 1

    def state_dict(self) -> dict:
        """What a checkpoint keeps: the averaged weights, the decay, the number of updates."""
        return {"ema_state_dict": self.module.state_dict(), "ema_decay": self.decay,
                "ema_updates": self.updates}  # fmt: skip
