"""mamba 1.1.1's module name for the norms (Vim imports it from here); see `layer_norm`."""

from mamba_ssm.ops.triton.layer_norm import RMSNorm, layer_norm_fn, rms_norm_fn

__all__ = ["RMSNorm", "layer_norm_fn", "rms_norm_fn"]
