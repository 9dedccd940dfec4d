"""Bicubic baseline: our MATLAB-exact bicubic upscaling, no parameters (the zero-cost path)."""

from dataclasses import replace

import torch

from sr_lib.models.base import Recipe, SRModel
from sr_lib.resize import imresize_torch


class Bicubic(SRModel):
    """MATLAB imresize(lr, scale) in float; training it is a no-op (`--steps 0`)."""

    tile_halo = 2  # the bicubic kernel's radius in LR px
    learns = False

    def __init__(self, cfg):
        super().__init__(cfg)
        # A zero-size buffer gives the module a device, so .to(device) works like any model.
        self.register_buffer("_device_anchor", torch.zeros(0), persistent=False)

    @classmethod
    def recipe(cls, scale: int) -> Recipe:
        return replace(super().recipe(scale), steps=0)

    def forward(self, lr, hr):
        lr, hr = self.check_inputs(lr, hr)  # one line for a wrong input, not a conv's error
        sr = imresize_torch(lr, self.scale)
        # No parameters: report the L1 error so validation logs stay meaningful.
        return {"loss": (sr - hr).abs().mean(), "sr": sr}

    def generate(self, lr, n, temperature, noise):
        sr = imresize_torch(lr, self.scale)
        return sr.unsqueeze(1).expand(-1, n, -1, -1, -1)
