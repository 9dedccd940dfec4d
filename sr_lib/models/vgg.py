"""Frozen VGG19 feature taps (the perceptual losses of sr_lib/models/losses.py build on them).

K. Simonyan, A. Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition",
ICLR 2015 (arXiv:1409.1556); the torchvision `vgg19` layout. Used by VSpSR and VarSR (a relu5_4 MSE
through `VGGLoss`; VSpSR without ImageNet normalisation: docs/vspsr.md "Losses") and RefVAE (its
relu4_1 encoder, content and style losses). The ImageNet weights come from the weights manifest
(`sr_lib.weights.torchvision_model`); a missing file raises CheckpointError with the staging hint.
Build a loss only when its weight is > 0, so a run without it never needs the file.
"""

import os

import torch
from torch import nn

from sr_lib.errors import CheckpointError, UsageError
from sr_lib.weights import resolve, torchvision_model

# vgg19.features: blocks of 2, 2, 4, 4, 4 conv-ReLU pairs, each block followed by a max-pool.
_BLOCKS = (2, 2, 4, 4, 4)


def _relu_indices() -> dict[str, int]:
    taps, i = {}, 0
    for b, n_conv in enumerate(_BLOCKS, 1):
        for c in range(1, n_conv + 1):
            taps[f"relu{b}_{c}"] = i + 1  # conv at i, its ReLU at i + 1
            i += 2
        i += 1  # the max-pool
    return taps


VGG19_RELU = _relu_indices()  # relu1_1 -> 1, ..., relu5_4 -> 35 (so features[:36] ends there)
NO_VGG = "or train without the perceptual loss: --lambda-per 0"  # VSpSR's and VarSR's way out
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class VGGFeatures(nn.Module):
    """vgg19.features cut after the deepest requested ReLU; frozen and always in eval mode.

    forward(x) takes RGB in [0, 1] and returns {tap: features}. With `imagenet_norm` the input is
    normalised by the ImageNet mean/std first (what the weights were trained on); VSpSR's code
    feeds [0, 1] directly, hence the default False. `missing_hint` ends the message of a missing
    weights file (e.g. how to train without this loss).
    """

    def __init__(
        self,
        layers: tuple[str, ...] = ("relu5_4",),
        imagenet_norm: bool = False,
        pretrained: bool = True,
        path: str | os.PathLike | None = None,
        missing_hint: str = "",
    ):
        super().__init__()
        unknown = [t for t in layers if t not in VGG19_RELU]
        if unknown or not layers:
            raise UsageError(
                f"VGG19 taps {unknown or '()'}: choose from {', '.join(VGG19_RELU)} "
                "(e.g. relu5_4 for content, relu1_1..relu4_1 for style)"
            )
        self.layers = tuple(layers)
        self.imagenet_norm = imagenet_norm
        last = max(VGG19_RELU[t] for t in self.layers)
        if pretrained:
            try:
                resolve("vgg19", path)  # fail before allocating the 548 MB random-init model
            except CheckpointError as e:  # what the user can do instead of staging the file
                raise CheckpointError(f"{e}{'; ' + missing_hint if missing_hint else ''}") from None
            vgg = torchvision_model("vgg19", path=path, pretrained=True)
            self.features = vgg.features[: last + 1]  # the classifier (120 M parameters) is dropped
        else:  # random weights (tests): skip initialising the classifier, seconds on a CPU
            # torchvision's first import runs tensor code (torch 2.6: torch._dynamo's), which
            # fails on the meta device ("Tensor.item() cannot be called on meta tensors")
            import torchvision  # noqa: F401

            with torch.device("meta"):
                vgg = torchvision_model("vgg19", pretrained=False)
            self.features = vgg.features[: last + 1].to_empty(device="cpu")
            # The same weights every time, drawn from their own seed, not the run's generator:
            # a model builds its loss on first use, so a resumed run would otherwise draw
            # another network (and other noise after it) than the run it continues.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                for m in self.features:
                    if isinstance(m, nn.Conv2d):  # torchvision's VGG initialisation
                        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                        nn.init.zeros_(m.bias)
        self.features.requires_grad_(False)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self._tap_at = {VGG19_RELU[t]: t for t in self.layers}
        super().train(False)

    def train(self, mode: bool = True) -> "VGGFeatures":
        return super().train(False)  # a fixed feature extractor: never batch-stat or dropout mode

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.imagenet_norm:
            x = (x - self.mean) / self.std
        out = {}
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self._tap_at:
                out[self._tap_at[i]] = x
        return out
