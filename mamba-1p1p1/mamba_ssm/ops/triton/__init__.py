"""Pure-PyTorch stand-ins for upstream's Triton kernels, at upstream's import paths."""
