"""dpcompile: differentially private training (DP-SGD) as a compiler transformation."""

__version__ = "0.1.0"
