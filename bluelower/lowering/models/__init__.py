"""The BlueLM-V architecture in plain PyTorch."""
