"""Samplers never build an autograd graph across steps, whatever score they are given.

With an `nn.Module` score (parameters that require grad) every sampler returns a tensor with
requires_grad=False, and the peak number of tensors held for backward stays the same for 3 and
for 12 steps (a graph kept across steps grows with their number: with the shipped MNIST U-Net,
40 predictor-corrector steps at batch 16 held about 6 GB). The tensors are counted with
`torch.autograd.graph.saved_tensors_hooks`, which sees every tensor autograd keeps.
"""

import pytest
import torch
from torch import nn

from lsgm_edu.controllable import colorize, conditional_score_fn, inpaint
from lsgm_edu.nets import ScoreMLP, ScoreModel
from lsgm_edu.samplers import (
    annealed_langevin,
    euler_maruyama,
    langevin,
    mala,
    predictor_corrector,
    probability_flow,
)
from lsgm_edu.sde import VPSDE


class _Token:
    def __init__(self, meter):
        self.meter = meter
        meter.alive += 1
        meter.peak = max(meter.peak, meter.alive)

    def __del__(self):
        self.meter.alive -= 1


class SavedTensorMeter:
    """Counts the tensors autograd holds for backward: now (`alive`) and at most (`peak`)."""

    def __init__(self):
        self.alive = self.peak = 0

    def __enter__(self):
        self.hooks = torch.autograd.graph.saved_tensors_hooks(
            lambda t: (t, _Token(self)), lambda packed: packed[0]
        )
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)


class TinyClassifier(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.lin = nn.Linear(dim + 1, 2)

    def forward(self, x, t):
        return self.lin(torch.cat([x.flatten(1), t[:, None]], 1))


def _score_model():
    torch.manual_seed(0)
    return ScoreModel(ScoreMLP(2, hidden=16, depth=1, generator=0), VPSDE(N=12), time_input="t")


def _image_score_model():
    torch.manual_seed(0)
    return ScoreModel(ImageNet(), VPSDE(N=12), time_input="t")


class ImageNet(nn.Module):
    """A 1x1 convolution with a time input: a score network for [B, 3, 4, 4] images."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x, t):
        return self.conv(x) * t[:, None, None, None]


def _run(name, steps):
    g = torch.Generator().manual_seed(0)
    model = _score_model()
    sde = model.sde
    x0 = torch.randn(8, 2, generator=g)
    if name == "langevin":
        return langevin(lambda x: model(x, torch.full((8,), 0.5)), x0, 0.01, steps, generator=g)
    if name == "mala":
        net = model.net
        return mala(lambda x: -net(x, torch.full((8,), 0.5)).pow(2).sum(1),
                    lambda x: model(x, torch.full((8,), 0.5)), x0, 0.01, steps, generator=g)
    if name == "annealed_langevin":
        return annealed_langevin(lambda x, s: model(x, s / 10), torch.linspace(1.0, 0.1, steps),
                                 (8, 2), 1, 1e-3, generator=g)
    if name == "euler_maruyama":
        return euler_maruyama(sde, model, (8, 2), steps, generator=g)
    if name == "predictor_corrector":
        return predictor_corrector(sde, model, (8, 2), steps, predictor="euler_maruyama",
                                   generator=g)
    if name == "probability_flow":
        return probability_flow(sde, model, (8, 2), method="euler", steps=steps, generator=g)
    if name == "class_conditional":
        guided = conditional_score_fn(model, TinyClassifier(2), 1)
        return predictor_corrector(sde, guided, (8, 2), steps, predictor="euler_maruyama",
                                   generator=g)
    if name == "inpaint":
        mask = torch.tensor([True, False])
        return inpaint(sde, model, x0, mask, steps, predictor="euler_maruyama", generator=g)
    if name == "colorize":
        image_model = _image_score_model()
        gray = torch.rand(2, 1, 4, 4, generator=g)
        return colorize(sde, image_model, gray, steps, predictor="euler_maruyama", generator=g)
    raise KeyError(name)


SAMPLERS = ["langevin", "mala", "annealed_langevin", "euler_maruyama", "predictor_corrector",
            "probability_flow", "inpaint", "colorize", "class_conditional"]


@pytest.mark.parametrize("name", SAMPLERS)
def test_sampler_keeps_no_graph(name):
    peaks = {}
    for steps in (3, 12):
        with SavedTensorMeter() as meter:
            x = _run(name, steps)
        assert not x.requires_grad, f"{name} returned a tensor that requires grad"
        assert x.grad_fn is None
        peaks[steps] = meter.peak
    assert peaks[12] == peaks[3], f"{name}: tensors held for backward grow with steps: {peaks}"
