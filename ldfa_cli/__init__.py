"""ldfa: training neural networks with low-dimensional error feedback."""

__version__ = "0.1.0"
