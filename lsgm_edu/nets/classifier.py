"""A small CNN digit classifier whose penultimate features define a FID for MNIST-size data.

The Inception network behind FID (Heusel et al. 2017) was trained on ImageNet photographs and
says little about 28x28 grey digits, so for MNIST-size data we compare samples in the feature
space of a classifier trained on the data itself; `lsgm_edu.metrics` trains, saves and uses
this network (`train_digit_classifier`, `classifier_fid`).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["DigitClassifier"]


class DigitClassifier(nn.Module):
    """Three 3x3 conv layers (16, 32, 64 channels, two 2x2 max-pools), a `feature_dim` ReLU
    layer and a linear head. Input: float images in [-1, 1], [B, 1, H, W] with H = W =
    image_size (28 for MNIST, 8 for scikit-learn's digits); `features` is the penultimate
    layer, `forward` the class logits. Weights get PyTorch's default init, U(+-1/sqrt(fan_in)),
    drawn from `generator` (a torch.Generator, an int seed, or None for seed 0)."""

    def __init__(
        self,
        image_size: int = 28,
        num_classes: int = 10,
        feature_dim: int = 128,
        *,
        generator: torch.Generator | int | None = None,
    ):
        super().__init__()
        for name, v, low in (
            ("image_size", image_size, 4),
            ("num_classes", num_classes, 2),
            ("feature_dim", feature_dim, 1),
        ):
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"DigitClassifier: {name} must be an int >= {low}, got {v!r}")
        self.image_size, self.num_classes, self.feature_dim = image_size, num_classes, feature_dim
        side = image_size // 4
        # built under a forked RNG so the layers' own init does not advance global random state
        with torch.random.fork_rng(devices=[]):
            self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
            self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
            self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
            self.fc = nn.Linear(64 * side * side, feature_dim)
            self.head = nn.Linear(feature_dim, num_classes)
        if generator is None or (isinstance(generator, int) and not isinstance(generator, bool)):
            generator = torch.Generator().manual_seed(0 if generator is None else generator)
        if not isinstance(generator, torch.Generator):
            raise TypeError(
                f"DigitClassifier: generator must be a torch.Generator, an int seed or None, "
                f"got {generator!r}"
            )
        with torch.no_grad():
            for layer in (self.conv1, self.conv2, self.conv3, self.fc, self.head):
                bound = 1.0 / math.sqrt(layer.weight[0].numel())
                for p in (layer.weight, layer.bias):
                    p.copy_(torch.empty_like(p).uniform_(-bound, bound, generator=generator))

    @property
    def config(self) -> dict:
        """Constructor arguments, enough to rebuild the architecture (saved in the sidecar)."""
        return {
            "image_size": self.image_size,
            "num_classes": self.num_classes,
            "feature_dim": self.feature_dim,
        }

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer activations [B, feature_dim] of images x in [-1, 1], [B, 1, H, W]."""
        if x.ndim != 4 or x.shape[1] != 1 or x.shape[2:] != (self.image_size,) * 2:
            raise ValueError(
                f"DigitClassifier: expected images [B, 1, {self.image_size}, {self.image_size}], "
                f"got {tuple(x.shape)}"
            )
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        h = F.relu(self.conv3(h))
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits [B, num_classes]."""
        return self.head(self.features(x))
