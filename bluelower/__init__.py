"""bluelower: lower a PyTorch vision-language model to a phone SoC through TVM Relax."""

__version__ = "0.1.0"
