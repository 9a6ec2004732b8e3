"""Post-training quantization of a Vim model for the CPU.

"dynamic-int8" replaces every nn.Linear (in_proj, x_proj, dt_proj, out_proj, head) with a
dynamically quantized one: int8 weights, activations quantized per call. The scan, the conv and
the norms stay float32, so the gain is bounded by the matmuls' share of the time.
"""

import warnings

import torch
import torch.nn as nn

from vim_rpi.errors import ConfigError, option

QUANTIZE_MODES = ("none", "dynamic-int8")


def quantize_model(model, mode):
    """Return `model` quantized as `mode` ("none" returns it unchanged); the input is not modified."""
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"quantize mode must be one of {', '.join(QUANTIZE_MODES)}, got {mode!r}")
    if mode == "none":
        return model
    engines = torch.backends.quantized.supported_engines
    if not any(e != "none" for e in engines):
        raise ConfigError(f"this PyTorch build has no quantized CPU engine; run with {option('quantize')} none",
                          "quantize")
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        # torch.ao.quantization announces its move to torchao on every call, and quantized tensor
        # creation its own deprecation; the API still works in every torch this project supports
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*deprecated", category=UserWarning)
        return quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
