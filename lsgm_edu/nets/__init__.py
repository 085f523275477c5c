"""Score networks and the wrappers that choose their parameterization."""

from .mlp import EpsToScore, GaussianFourierProjection, ScoreMLP

__all__ = ["EpsToScore", "GaussianFourierProjection", "ScoreMLP"]
