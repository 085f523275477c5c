"""lsgm_edu: score-based generative models, from score matching to LSGM and PSLD."""

__version__ = "0.2.0"  # shared by the book (CITATION.cff, CHANGELOG.md)
