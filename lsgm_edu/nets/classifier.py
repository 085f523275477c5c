"""A small CNN digit classifier whose penultimate features define a FID for MNIST-size data.

The Inception network behind FID (Heusel et al. 2017) was trained on ImageNet photographs and
says little about 28x28 grey digits, so for MNIST-size data we compare samples in the feature
space of a classifier trained on the data itself; `lsgm_edu.metrics` trains, saves and uses
this network; it is trained here (`train_digit_classifier`), saved, loaded and used by
`lsgm_edu.metrics` (`save_classifier`, `load_classifier`, `classifier_fid`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from ..data import to_model

__all__ = [
    "DigitClassifier",
    "check_digit_images",
    "classifier_input",
    "random_affine_jitter",
    "train_digit_classifier",
]


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


def check_digit_images(fn: str, images, image_size: int | None = None) -> torch.Tensor:
    """Grey uint8 images as a tensor [N, 1, H, W] (from [N, 1, H, W] or [N, H, W], tensor or
    array), H = W = image_size if given; otherwise a ValueError naming `fn`."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if isinstance(images, torch.Tensor) and images.ndim == 3:
        images = images.unsqueeze(1)
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
        what = (f"{images.dtype} tensor of shape {tuple(images.shape)}"
                if isinstance(images, torch.Tensor) else type(images).__name__)
        raise ValueError(f"{fn}: images must be uint8 [N, 1, H, W], got {what}")
    if images.shape[1] != 1 or (image_size is not None and images.shape[2:] != (image_size,) * 2):
        size = "H, W" if image_size is None else f"{image_size}, {image_size}"
        raise ValueError(f"{fn}: expected grey images [N, 1, {size}], got {tuple(images.shape)}")
    return images


def classifier_input(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 {0, ..., 255} -> float32 [-1, 1], the classifier's input (`data.to_model`, 8-bit
    levels scaled by x / 255, centred)."""
    return to_model(images_uint8, 256, discretization="scale", centered=True)


def random_affine_jitter(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random affine jitter per image of x [B, 1, H, W] in [-1, 1]: rotation +-10 deg, scale
    0.9-1.1, shift +-1/14 of the side (2 pixels at 28x28); the background stays at -1."""
    b = x.shape[0]
    u = torch.rand(b, 4, generator=generator) * 2 - 1
    angle, scale = u[:, 0] * math.radians(10), 1 + 0.1 * u[:, 1]
    shift = u[:, 2:] * (2 / 14)  # the grid spans [-1, 1], so 1/14 of the side is 2/14
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    ).to(x)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # sample x + 1 with zero padding, so the background stays at -1 (black)
    return F.grid_sample(x + 1, grid, align_corners=False) - 1


def train_digit_classifier(
    images_uint8,
    labels,
    *,
    steps: int = 1000,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    num_classes: int = 10,
    feature_dim: int = 128,
    augment: bool = True,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> DigitClassifier:
    """Train a `DigitClassifier` on grey uint8 images [N, 1, H, W] (or [N, H, W]) and labels [N].

    Adam with a cosine learning-rate decay, cross-entropy, minibatches drawn with replacement and
    randomly jittered (`augment`, `random_affine_jitter`; on 8x8 digits training without it
    does better), every draw from a generator seeded by `seed`. Returns the model in eval mode;
    its `metadata["training"]` records these arguments for the sidecar.
    """
    fn = "train_digit_classifier"
    images = check_digit_images(fn, images_uint8)
    labels = torch.as_tensor(labels).to(torch.int64).reshape(-1)
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"{fn}: {images.shape[0]} images but {labels.shape[0]} labels")
    if labels.numel() == 0 or int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(f"{fn}: labels must lie in {{0, ..., {num_classes - 1}}}")
    for name, v in (("steps", steps), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{fn}: {name} must be an int >= 1, got {v!r}")
    device = torch.device("cpu" if device is None else device)
    g = torch.Generator().manual_seed(seed)
    model = DigitClassifier(images.shape[-1], num_classes, feature_dim, generator=g).to(device)
    x_all = classifier_input(images)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    bar = tqdm(range(steps), disable=not progress, desc="classifier")
    for _ in bar:
        idx = torch.randint(0, x_all.shape[0], (batch_size,), generator=g)
        x = random_affine_jitter(x_all[idx], g) if augment else x_all[idx]
        loss = F.cross_entropy(model(x.to(device)), labels[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()
    model.metadata = {
        "training": {
            "function": f"lsgm_edu.nets.classifier.{fn}",
            "n_images": int(images.shape[0]),
            "steps": steps,
            "batch_size": batch_size,
            "lr": lr,
            "seed": seed,
            "augment": augment,
        }
    }
    return model
