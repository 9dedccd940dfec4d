"""The LPIPS network, v0.1 with the AlexNet trunk, built without any download.

R. Zhang et al., "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric", CVPR
2018; the `lpips` package. Used by the evaluation metric (`sr_lib.metrics.LpipsMetric`) and by
RefVAE's LPIPS loss. The learned linear heads ship inside the lpips package; the ImageNet AlexNet
trunk comes from the weights manifest (`sr_lib.weights`, entry `alexnet`).
"""

import warnings
from pathlib import Path

import torch

from sr_lib import weights
from sr_lib.errors import CheckpointError

# torchvision AlexNet `features.{i}` -> lpips `net.slice{s}.{i}` (slices end at the 5 ReLU taps).
_ALEX_SLICES = {0: 1, 3: 2, 6: 3, 8: 4, 10: 5}


def lpips_module() -> torch.nn.Module:
    """A fresh `lpips.LPIPS(net="alex", version="0.1", spatial=True)` without any download.

    Its trunk is randomly initialised until a state_dict is loaded (`load_alexnet_trunk`).
    """
    import lpips  # imported here: it pulls in torchvision

    # Its random weights are drawn from their own seed, not the caller's generator: RefVAE builds
    # its LPIPS loss on first use, so a resumed run would otherwise draw other noise after it
    # than the run it continues (and another trunk, untrained: tests).
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.simplefilter("ignore")  # torchvision's `pretrained=` deprecation, inside lpips
        torch.manual_seed(0)
        # pretrained=True loads the v0.1 linear heads shipped inside the lpips package;
        # pnet_rand=True keeps torchvision from downloading the trunk (loaded afterwards).
        return lpips.LPIPS(
            net="alex", version="0.1", spatial=True, pretrained=True, pnet_rand=True, verbose=False
        )


def alex_tap_values(h: int, w: int) -> int:
    """float32 values in the 5 ReLU taps of lpips' AlexNet for one H x W input (one sample).

    conv1 (11x11, stride 4, padding 2) has 64 channels, conv2 192 after a 3x3/2 max-pooling,
    conv3..conv5 384, 256, 256 after another: 114 MB of float32 for a 2040x1352 crop.
    """
    h1, w1 = (h + 4 - 11) // 4 + 1, (w + 4 - 11) // 4 + 1
    h2, w2 = (h1 - 3) // 2 + 1, (w1 - 3) // 2 + 1
    h3, w3 = (h2 - 3) // 2 + 1, (w2 - 3) // 2 + 1
    return 64 * h1 * w1 + 192 * h2 * w2 + (384 + 256 + 256) * h3 * w3


def heads_file() -> Path:
    """The v0.1 AlexNet linear heads shipped inside the lpips package."""
    import lpips

    return Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth"


def alexnet_to_lpips(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a torchvision AlexNet state_dict onto lpips' trunk keys (`slice1.0.weight`, ...)."""
    out = {}
    for i, s in _ALEX_SLICES.items():
        for p in ("weight", "bias"):
            out[f"slice{s}.{i}.{p}"] = sd.get(f"features.{i}.{p}")
    missing = [k for k, v in out.items() if v is None]
    if missing:
        raise CheckpointError(
            f"not a torchvision AlexNet state_dict: {len(missing)} trunk tensors missing "
            f"(e.g. features.{missing[0].split('.', 1)[1]})"
        )
    return out


def load_alexnet_trunk(net: torch.nn.Module, offline: bool | None = None) -> Path:
    """Load the manifest's ImageNet AlexNet into the trunk of an `lpips_module()`, strictly.

    Returns the weights file; a missing one is a CheckpointError with a staging hint.
    """
    path = weights.resolve("alexnet", offline=offline)
    trunk = alexnet_to_lpips(weights.load_state_dict(path))
    weights.load_strict(net.net, trunk, f"{path} does not fit the AlexNet trunk")
    return path
