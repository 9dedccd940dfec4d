"""Exponential moving average of a model's weights: `sr_train.py --ema DECAY`.

The average starts as a copy of the weights training starts from (after data-dependent
initialisation, such as ActNorm's, and weights loaded at the first step, such as `--rrdb-init`),
as BasicSR, KAIR and neosr start theirs. After every applied training step,
average ← average + (1 − decay) · (weights − average), over the parameters and the floating-point
buffers (ActNorm and BatchNorm statistics); integer and boolean buffers (counters, flags) are
copied. A step skipped as non-finite changes nothing. The averaged weights usually validate
better than the raw ones late in training and smooth the oscillations of GAN training.

The average is a full copy of the model (`module`, always in eval mode) but for the frozen loss
networks (VGG, LPIPS) that a model keeps out of state_dict in a list, which the copy shares:
validation samples from it directly, and checkpoints save its state_dict as `ema_state_dict`
(the keys of `state_dict`), which `sr_lib.models.load_model` loads unless asked for the raw
weights.
"""

import copy

import torch
from torch import nn


class EMA:
    """The average of `model`'s weights; continued from checkpoint `resumed` if that holds one."""

    def __init__(self, model: nn.Module, decay: float, resumed: dict | None = None, path=""):
        self.decay = decay
        self.module = copy.deepcopy(model, shared_frozen(model)).eval().requires_grad_(False)
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
        device = next(iter(theirs.values())).device if theirs else torch.device("cpu")
        self.rate = torch.tensor(1.0 - decay, device=device)  # on the device: no host transfer
        self.updates = torch.zeros((), dtype=torch.long, device=device)  # applied steps
        if resumed is not None:
            self.restore(resumed, path)

    def restore(self, checkpoint: dict, path="") -> None:
        """Continue the average a checkpoint holds (resume, --on-nan rollback); its decay is
        replaced by ours. A checkpoint without one leaves the average as it is."""
        if "ema_state_dict" in checkpoint:
            self.module.load_weights(checkpoint["ema_state_dict"], f"{path} (ema_state_dict)")
            self.updates.fill_(int(checkpoint["ema_updates"]))

    @torch.no_grad()
    def update(self, applied: bool | torch.Tensor = True) -> None:
        """Average in the model's weights after a training step. `applied`: whether the step
        changed them, a bool or a 0-dim tensor on the device (1 or 0), which is never read on the
        host: with 0 the average stays as it is."""
        if applied is False:
            return
        averages, weights = self._floats
        if averages:
            rate = self.rate if isinstance(applied, bool) else self.rate * applied
            step = torch._foreach_sub(weights, averages)
            torch._foreach_mul_(step, rate)  # a 0-dim device tensor: no host sync on CUDA
            torch._foreach_add_(averages, step)
        for a, w in zip(*self._others):
            a.copy_(w if isinstance(applied, bool) else torch.where(applied > 0, w, a))
        self.updates += applied if isinstance(applied, bool) else applied.long()

    def state_dict(self) -> dict:
        """What a checkpoint keeps: the averaged weights, the decay, the number of updates."""
        return {"ema_state_dict": self.module.state_dict(), "ema_decay": self.decay,
                "ema_updates": int(self.updates)}  # fmt: skip


def shared_frozen(model: nn.Module) -> dict:
    """A deepcopy memo that keeps the frozen loss networks built so far (VGG19, LPIPS: the
    non-empty lists of modules a model holds out of state_dict) shared with `model`. The average
    never trains them and they never change, and a copy would hold them twice: VGG19 to relu5_4
    is 20M parameters, 80 MB in float32, on the GPU."""
    memo = {}
    for m in model.modules():
        for v in vars(m).values():
            if isinstance(v, list) and v and all(isinstance(x, nn.Module) for x in v):
                memo[id(v)] = v
    return memo
