"""Argument checks for the kernel functions, here and in the packages built on this one."""


def shape_error(arg, expected, tensor):
    return ValueError(f"{arg} must have shape {expected}, got {tuple(tensor.shape)}")


def check_floating(**tensors):
    """Raise TypeError for any given tensor that is not floating point: the kernels compute in
    float32/float64 and would otherwise truncate integer inputs or write into integer outputs."""
    for name, t in tensors.items():
        if t is not None and not (t.is_floating_point() or t.is_complex()):
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
