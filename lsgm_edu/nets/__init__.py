"""Score networks and the wrappers that choose their parameterization."""

from .classifier import DigitClassifier
from .mlp import EpsToScore, GaussianFourierProjection, ScoreMLP
from .precond import ScoreModel, noise_label
from .unet import UNet, UNetConfig, build_model

__all__ = [
    "DigitClassifier",
    "EpsToScore",
    "GaussianFourierProjection",
    "ScoreMLP",
    "ScoreModel",
    "UNet",
    "UNetConfig",
    "build_model",
    "noise_label",
]
