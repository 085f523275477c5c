"""lsgm_edu: score-based generative models, from score matching to LSGM and PSLD."""

__version__ = "0.1.0"
