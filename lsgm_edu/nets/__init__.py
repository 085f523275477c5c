"""Score networks and the wrappers that choose their parameterization."""

from .classifier import DigitClassifier, train_digit_classifier
from .mlp import GaussianFourierProjection, NoiseConditionalClassifier, ScoreMLP
from .precond import MixedScore, ScoreModel
from .unet import UNet, UNetConfig, build_model

__all__ = [
    "DigitClassifier",
    "GaussianFourierProjection",
    "MixedScore",
    "NoiseConditionalClassifier",
    "ScoreMLP",
    "ScoreModel",
    "UNet",
    "UNetConfig",
    "build_model",
    "train_digit_classifier",
]
