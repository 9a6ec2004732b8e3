"""mamba 1.1.1's module path for the norms: the functions (`ops.norms`) and the `RMSNorm` module."""

import torch
import torch.nn as nn

from mamba_ssm.modules.backend_choice import KernelHolder
from mamba_ssm.ops.norms import layer_norm_fn, rms_norm_fn

__all__ = ["RMSNorm", "layer_norm_fn", "rms_norm_fn"]


class RMSNorm(KernelHolder, nn.Module):
    """RMSNorm over the last dim: a `weight` parameter, `bias` registered as None.

    Runs the norm kernel of its kernel set (`KernelHolder`: resolved when built, moved, loaded or
    told a backend with `set_backend`), not a per-call choice.
    """

    def __init__(self, hidden_size, eps=1e-5, dropout_p=0.0, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.drop = nn.Dropout(dropout_p) if dropout_p > 0.0 else None
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)
        self._init_kernels()

    def _kernel_request(self):
        return dict(device=self.weight.device.type, dtype=self.weight.dtype, needs=("norm",))

    def forward(self, x, residual=None, prenorm=False, residual_in_fp32=False):
        """x, residual: (..., hidden) -> out, or (out, x + residual) with prenorm (see `add_norm`)."""
        if self.drop is not None:
            x = self.drop(x)
        return self.add_norm(x, residual, prenorm, residual_in_fp32)

    def add_norm(self, x, residual=None, prenorm=False, residual_in_fp32=False):
        """`rms_norm_fn` with this module's weight, eps and norm kernel, without the dropout: the
        fused add + norm that `Block` and Vim's final norm run. x, residual: (..., hidden)."""
        return self.kernels_for_call().norm(x, self.weight, self.bias, residual, self.eps, prenorm, residual_in_fp32)
