"""weft: curate multimodal training data and train a BAGEL-style MoT model on it."""

__version__ = "0.1.0"
