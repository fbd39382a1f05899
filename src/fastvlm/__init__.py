"""FastVLM in plain PyTorch."""
