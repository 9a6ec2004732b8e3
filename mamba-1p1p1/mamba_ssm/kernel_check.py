"""Whether the fused numba kernels will run, checked as set-up must before it says so:
`python -m mamba_ssm.kernel_check`.

Loads the kernels (compiling them into the cache first when it holds no valid entry, see
`mamba_ssm.ops.kernel_cache`), runs a small Vim v2 mixer and the residual add + RMSNorm on them
and on the pure-PyTorch path, and prints one line: what was checked and where the kernels are
cached, or why they will not run. Exit status 0 only when they will run.
"""

import sys
import warnings

import torch

TOL = 1e-4  # largest difference over the reference's largest magnitude: float32 rounding is ~1e-6


def _difference(got, want):
    return ((got - want).abs().max() / want.abs().max()).item()


def _mixer_difference():
    """A v2 mixer (d_inner 80: a partial channel block; 11 tokens) on both paths."""
    from mamba_ssm import Mamba

    outputs = []
    for backend in ("numba", "torch"):  # "numba" by name: an error, not the torch path, if it cannot run
        torch.manual_seed(0)
        mixer = Mamba(40, d_state=8, bimamba_type="v2", if_divide_out=True)
        with torch.no_grad():
            for p in mixer.parameters():  # the two directions' parameters differ
                p.add_(torch.randn_like(p) * 0.2)
        x = torch.randn(2, 11, 40)
        with torch.inference_mode():
            outputs.append(mixer.set_backend(backend).eval()(x))
    return _difference(*outputs)


def _norm_difference():
    """The fused residual add + RMSNorm, both outputs, on both paths."""
    from mamba_ssm import use_backend
    from mamba_ssm.ops.triton.layer_norm import rms_norm_fn

    generator = torch.Generator().manual_seed(1)
    x, residual = torch.randn(2, 2, 11, 40, generator=generator)
    weight = torch.randn(40, generator=generator)
    outputs = []
    for backend in ("numba", "torch"):
        with use_backend(backend), torch.inference_mode():
            outputs.append(rms_norm_fn(x, weight, None, residual=residual, eps=1e-5, prenorm=True))
    (out, s), (want_out, want_s) = outputs
    return max(_difference(out, want_out), _difference(s, want_s))


def check():
    """(whether the fused kernels will run, a one-line report). Never raises for a failure of
    the kernels: the report says what failed."""
    from mamba_ssm.ops import bimamba_v2_numba, kernel_cache

    with warnings.catch_warnings(record=True) as caught:  # the cache's warnings join the report
        warnings.simplefilter("always")
        error = bimamba_v2_numba.load_error()
        if error is None:
            try:
                difference = max(_mixer_difference(), _norm_difference())
            except RuntimeError as e:
                error = str(e)
    if error is not None:
        return False, f"the fused numba kernels will not run ({error}); the pure-PyTorch path will"
    notes = "".join(f"; warning: {w.message}" for w in caught)
    path = bimamba_v2_numba.warm_up()  # loaded already
    if not difference <= TOL:  # NaN included
        wrong = f"they differ from the pure-PyTorch path by {difference:.2g} (tolerance {TOL:g})"
        if path is None:
            after = "they are not cached (each process compiles them): run with SELECTIVE_SCAN_CPU_BACKEND=torch"
        else:
            try:
                kernel_cache.reject(path, wrong)
                after = f"marked {path} as wrong, so models run the pure-PyTorch path (and say why)"
            except OSError as e:
                after = f"{path} could not be marked ({e.strerror or e}): run with SELECTIVE_SCAN_CPU_BACKEND=torch"
        return False, f"the fused numba kernels will not be used: {wrong}; {after}; please report it{notes}"
    where = f"cached in {path}" if path is not None else "not cached"
    return True, (f"ok: the fused numba kernels match the pure-PyTorch path (largest difference "
                  f"{difference:.1e}), {where}{notes}")


def main():
    ok, report = check()
    print(report)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
