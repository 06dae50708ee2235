"""arborl: a model gateway that records exact tokens into prefix trees, with an online RL loop behind it."""

__version__ = "0.1.0"
