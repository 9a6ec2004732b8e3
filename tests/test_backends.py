"""Backend choice of causal_conv1d and mamba_ssm (`causal_conv1d.backends`, `mamba_ssm.ops.backends`):
the function-level API's environment variables read per call and use_backend; a model's kernels
resolved once (variables read then); routing to upstream's compiled modules, explicit choices
that cannot run, import safety, install.

There is no GPU here: a "CUDA tensor" is a CPU tensor whose `is_cuda` says True (the function-level
API decides on `x.is_cuda`), a "CUDA model" a module whose kernels were resolved for the device
type "cuda", and the compiled modules `causal_conv1d_cuda` / `selective_scan_cuda` are test
doubles placed in sys.modules that record their calls and return correct results.
"""

import importlib.util
import json
import pathlib
import shutil
import subprocess
import sys
import threading
import types
import warnings
import zipfile

import pytest
import torch
import torch.nn.functional as F

import causal_conv1d
import mamba_ssm
from causal_conv1d import causal_conv1d_fn, causal_conv1d_update
from causal_conv1d import backends
from mamba_ssm import Mamba, env
from mamba_ssm.ops import backends as scan_backends
from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
from test_causal_conv1d import conv_oracle, make_inputs, rel_err
from test_mamba_module import hidden_states, make_mixer, mixer_oracle, params64
from test_selective_scan import make_scan_inputs, scan_oracle

CONV_ENV, SCAN_ENV = "CAUSAL_CONV1D_FORCE_FALLBACK", "SELECTIVE_SCAN_FORCE_FALLBACK"
CONV_EXT, SCAN_EXT = "causal_conv1d_cuda", "selective_scan_cuda"
REPO = pathlib.Path(__file__).resolve().parent.parent


class FakeCuda(torch.Tensor):
    """A CPU tensor that reports is_cuda = True."""

    is_cuda = property(lambda self: True)


def fake_cuda(t):
    return torch.Tensor._make_subclass(FakeCuda, t)


def plain(t):
    return None if t is None else t.as_subclass(torch.Tensor)


def conv_double(calls):
    """A stand-in for upstream's causal_conv1d_cuda (1.4 signatures)."""
    module = types.ModuleType(CONV_EXT)

    def causal_conv1d_fwd(x, weight, bias, seq_idx, initial_states, final_states_out, silu):
        calls.append("conv_fwd")
        out, final = conv_oracle(plain(x), plain(weight), plain(bias), plain(initial_states),
                                 "silu" if silu else None, plain(seq_idx))
        if final_states_out is not None:
            final_states_out.copy_(final)
        return fake_cuda(out.to(x.dtype))  # results live on the inputs' device

    def causal_conv1d_bwd(x, weight, bias, dout, seq_idx, initial_states, dfinal_states, dx,
                          return_dinitial_states, silu):
        calls.append("conv_bwd")
        return (torch.full_like(plain(x), 2.0), torch.zeros_like(plain(weight)),
                None if bias is None else torch.zeros_like(plain(bias)), None)

    def causal_conv1d_update(x, conv_state, weight, bias, silu, cache_seqlens):
        calls.append("conv_update")
        return torch.zeros_like(plain(x))

    module.causal_conv1d_fwd = causal_conv1d_fwd
    module.causal_conv1d_bwd = causal_conv1d_bwd
    module.causal_conv1d_update = causal_conv1d_update
    return module


def scan_double(calls):
    """A stand-in for upstream's selective_scan_cuda (mamba 1.1.1 signatures): fwd returns
    (out, x, out_z) with x (b, d, n_chunks, 2n) holding the last state at [..., -1, 1::2]."""
    module = types.ModuleType(SCAN_EXT)

    def fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        calls.append("scan_fwd")
        assert B.dim() == 4 and C.dim() == 4  # upstream's kernel takes (b, g, n, l)
        y, last = scan_oracle(plain(u), plain(delta), plain(A), plain(B), plain(C), plain(D), None,
                              plain(delta_bias), delta_softplus)
        b, d, n = last.shape
        x = torch.zeros(b, d, 2, 2 * n, dtype=torch.float32)
        x[:, :, -1, 1::2] = last.float()
        out = fake_cuda(y.to(u.dtype))  # results live on the inputs' device
        if z is None:
            return [out, x]
        return [out, x, fake_cuda((y * F.silu(plain(z).double())).to(u.dtype))]

    def bwd(u, delta, A, B, C, D, z, delta_bias, dout, x, out, dz, delta_softplus, recompute):
        calls.append("scan_bwd")
        grads = [torch.full_like(plain(u), 3.0)] + [torch.zeros_like(plain(t)) for t in (delta, A, B, C)]
        grads += [None if t is None else torch.zeros_like(plain(t)) for t in (D, delta_bias)]
        return grads + ([torch.zeros_like(plain(z))] if z is not None else [])

    module.fwd = fwd
    module.bwd = bwd
    return module


@pytest.fixture
def clean(monkeypatch):
    """No variable set, no extension module, the torch CPU scan, and the one-time warnings re-armed."""
    monkeypatch.delenv(CONV_ENV, raising=False)
    monkeypatch.delenv(SCAN_ENV, raising=False)
    monkeypatch.setenv(env.CPU_BACKEND_ENV, "torch")
    for name in (CONV_EXT, SCAN_EXT):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(backends, "_warned", set())
    return monkeypatch


@pytest.fixture
def doubles(clean):
    """Both compiled modules importable (as recording doubles); returns the call log."""
    calls = []
    clean.setitem(sys.modules, CONV_EXT, conv_double(calls))
    clean.setitem(sys.modules, SCAN_EXT, scan_double(calls))
    return calls


def conv_call(x):
    _, weight, bias, _ = make_inputs(*x.shape, 4, seed=1)
    want, _ = conv_oracle(plain(x), weight, bias, activation="silu")
    return causal_conv1d_fn(x, weight, bias, activation="silu"), want


def scan_call(**overrides):
    inputs = make_scan_inputs(2, 4, 3, 6, seed=2)
    inputs.update(overrides)
    return selective_scan_fn(**inputs, delta_softplus=True, return_last_state=True), inputs


def which_both(x):
    return causal_conv1d.which_backend(x), mamba_ssm.which_backend(x)


@pytest.mark.parametrize("value", ["true", "TRUE", "True", "1", "yes", "YES", " true "])
def test_forced_fallback_ignores_importable_extension(doubles, clean, value):
    clean.setenv(CONV_ENV, value)
    clean.setenv(SCAN_ENV, value)
    x = fake_cuda(torch.randn(2, 4, 6))
    assert which_both(x) == ("torch", "torch")
    out, want = conv_call(x)
    assert rel_err(out, want) <= 1e-4
    (out, last), inputs = scan_call(u=fake_cuda(make_scan_inputs(2, 4, 3, 6, seed=2)["u"]))
    assert rel_err(out, scan_oracle(**inputs, delta_softplus=True)[0]) <= 1e-4
    assert doubles == []


@pytest.mark.parametrize("value", [None, "", "0", "FALSE", "false", "no", "off", "2"])
def test_not_forced_routes_cuda_tensors_to_extension(doubles, clean, value):
    if value is not None:
        clean.setenv(CONV_ENV, value)
        clean.setenv(SCAN_ENV, value)
    x = fake_cuda(torch.randn(2, 4, 6))
    assert which_both(x) == ("cuda", "cuda")
    assert which_both(torch.randn(2, 4, 6)) == ("torch", "torch")  # CPU tensors never go to CUDA
    out, want = conv_call(x)
    assert doubles == ["conv_fwd"] and rel_err(out, want) <= 1e-6
    inputs = make_scan_inputs(2, 4, 3, 6, seed=2)
    out, last = selective_scan_fn(fake_cuda(inputs.pop("u")), **inputs, delta_softplus=True, return_last_state=True)
    want, want_last = scan_oracle(**make_scan_inputs(2, 4, 3, 6, seed=2), delta_softplus=True)
    assert doubles == ["conv_fwd", "scan_fwd"]
    assert rel_err(out, want) <= 1e-6 and rel_err(last, want_last) <= 1e-6


def test_variables_are_read_per_call(doubles, clean):
    x = fake_cuda(torch.randn(2, 4, 6))
    expected = []
    for value, routed in (("TRUE", False), ("0", True), (None, True), ("yes", False), ("", True), ("1", False)):
        if value is None:
            clean.delenv(CONV_ENV)
            clean.delenv(SCAN_ENV)
        else:
            clean.setenv(CONV_ENV, value)
            clean.setenv(SCAN_ENV, value)
        conv_call(x)
        scan_call(u=fake_cuda(make_scan_inputs(2, 4, 3, 6, seed=2)["u"]))
        expected += ["conv_fwd", "scan_fwd"] if routed else []
        assert doubles == expected, value
    # the two variables are independent
    clean.setenv(CONV_ENV, "TRUE")
    clean.delenv(SCAN_ENV)
    assert which_both(x) == ("torch", "cuda")


def test_extension_backward_and_update_are_routed(doubles):
    x = fake_cuda(torch.randn(2, 4, 6)).requires_grad_()
    _, weight, bias, _ = make_inputs(2, 4, 6, 4, seed=1)
    causal_conv1d_fn(x, weight, bias, activation="silu").sum().backward()
    assert doubles == ["conv_fwd", "conv_bwd"] and torch.equal(plain(x.grad), torch.full((2, 4, 6), 2.0))

    inputs = make_scan_inputs(2, 4, 3, 6, seed=2)
    u = fake_cuda(inputs.pop("u")).requires_grad_()
    selective_scan_fn(u, **inputs, delta_softplus=True).sum().backward()
    assert doubles[2:] == ["scan_fwd", "scan_bwd"] and torch.equal(plain(u.grad), torch.full((2, 4, 6), 3.0))

    state = torch.zeros(2, 4, 3)
    causal_conv1d_update(fake_cuda(torch.randn(2, 4)), state, weight, bias, "silu")
    assert doubles[-1] == "conv_update"


@pytest.fixture
def cuda_modules(monkeypatch):
    """Mamba modules resolve their kernels as if their parameters lived on a GPU."""
    real = Mamba._kernel_request
    monkeypatch.setattr(Mamba, "_kernel_request", lambda self: {**real(self), "device": "cuda"})


@pytest.mark.parametrize("bimamba_type", ["v2", "v1", "none"])
def test_mamba_module_routes_cuda_tensors_to_extensions(doubles, cuda_modules, bimamba_type):
    m = make_mixer(bimamba_type, dtype=torch.float64, if_divide_out=True).eval()
    h = hidden_states(dtype=torch.float64)
    assert mamba_ssm.kernel_report(m)["selective_scan"] == "cuda"
    with torch.no_grad():
        out = m(fake_cuda(h))
    directions = 2 if bimamba_type == "v2" else 1
    scans = 1 if bimamba_type == "none" else 2
    assert doubles.count("conv_fwd") == directions and doubles.count("scan_fwd") == scans
    assert rel_err(plain(out), mixer_oracle(params64(m), h, bimamba_type, True)) <= 1e-10


def test_a_model_reads_the_variables_when_it_resolves_not_per_forward(doubles, cuda_modules, clean):
    """The function-level API reads the FORCE_FALLBACK variables per call; a model when its kernels
    are resolved (built, moved, loaded, told a backend, or refresh_kernels)."""
    clean.setenv(CONV_ENV, "TRUE")
    clean.setenv(SCAN_ENV, "TRUE")
    m = make_mixer("none", dtype=torch.float64).eval()  # resolved with the fallback forced
    h = fake_cuda(hidden_states(dtype=torch.float64))
    clean.delenv(CONV_ENV)
    clean.delenv(SCAN_ENV)
    with torch.no_grad():
        m(h)
    assert doubles == []  # still the torch kernels it holds
    m.refresh_kernels()
    with torch.no_grad():
        m(h)
    assert doubles == ["conv_fwd", "scan_fwd"]
    clean.setenv(SCAN_ENV, "1")
    m.double()  # moved or cast: resolved again
    report = mamba_ssm.kernel_report(m)
    assert (report["causal_conv1d"], report["selective_scan"]) == ("cuda", "torch")


def test_cuda_tensor_without_extension_warns_once(clean):
    if any(importlib.util.find_spec(name) is not None for name in (CONV_EXT, SCAN_EXT)):
        pytest.skip("an upstream CUDA extension is installed here")
    x = fake_cuda(torch.randn(2, 4, 6))
    with pytest.warns(RuntimeWarning, match=CONV_ENV) as record:
        out, want = conv_call(x)
        conv_call(x)
    assert len(record) == 1 and rel_err(out, want) <= 1e-4
    with pytest.warns(RuntimeWarning, match=SCAN_ENV) as record:
        assert mamba_ssm.which_backend(x) == "torch"
        scan_call(u=fake_cuda(make_scan_inputs(2, 4, 3, 6, seed=2)["u"]))
    assert len(record) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert which_both(x) == ("torch", "torch")


def test_forced_fallback_does_not_warn(clean):
    clean.setenv(CONV_ENV, "TRUE")
    clean.setenv(SCAN_ENV, "TRUE")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert which_both(fake_cuda(torch.randn(2, 4, 6))) == ("torch", "torch")


@pytest.mark.parametrize("package", [causal_conv1d, mamba_ssm])
def test_use_backend_context_manager(clean, package):
    x = torch.randn(2, 4, 6)
    assert package.which_backend(x) == "torch"
    with package.use_backend("ref"):
        assert package.which_backend(x) == "ref"
        with package.use_backend("torch"):
            assert package.which_backend(x) == "torch"
        assert package.which_backend(x) == "ref"
        with pytest.raises(KeyError):
            with package.use_backend("torch"):
                raise KeyError("boom")
        assert package.which_backend(x) == "ref"
    assert package.which_backend(x) == "torch"
    # the override wins over the variable, and holds for this thread only
    clean.setenv(CONV_ENV, "TRUE")
    clean.setenv(SCAN_ENV, "TRUE")
    seen = []
    with package.use_backend("ref"):
        assert package.which_backend(x) == "ref"
        thread = threading.Thread(target=lambda: seen.append(package.which_backend(x)))
        thread.start()
        thread.join()
    assert seen == ["torch"]


@pytest.mark.parametrize("package", [causal_conv1d, mamba_ssm])
def test_use_backend_errors(clean, package):
    x = torch.randn(2, 4, 6)
    with pytest.raises(ValueError, match=r"unknown backend 'gpu'.*auto.*ref.*torch.*numba.*cuda"):
        with package.use_backend("gpu"):
            pass
    assert package.which_backend(x) == "torch"
    if importlib.util.find_spec(CONV_EXT) is None and importlib.util.find_spec(SCAN_EXT) is None:
        with package.use_backend("cuda"), pytest.raises(RuntimeError, match="_cuda"):
            package.which_backend(fake_cuda(x))


@pytest.mark.parametrize("package", [causal_conv1d, mamba_ssm])
def test_use_backend_cuda_with_extension(doubles, clean, package):
    clean.setenv(CONV_ENV, "TRUE")  # the explicit choice wins over the variable
    clean.setenv(SCAN_ENV, "TRUE")
    with package.use_backend("cuda"):
        assert package.which_backend(fake_cuda(torch.randn(2, 4, 6))) == "cuda"
        with pytest.raises(RuntimeError, match="CUDA tensors"):
            package.which_backend(torch.randn(2, 4, 6))


def test_backend_report(doubles, clean):
    x = torch.randn(2, 4, 6)
    assert mamba_ssm.backend_report(fake_cuda(x)) == {
        "backend": "auto", "causal_conv1d": "cuda", "selective_scan": "cuda", "cpu_scan_setting": "torch",
        "causal_conv1d_cuda_importable": True, "selective_scan_cuda_importable": True}
    assert causal_conv1d.backend_report(fake_cuda(x)) == {  # the lower package knows its own family only
        "backend": "auto", "causal_conv1d": "cuda", "causal_conv1d_cuda_importable": True}
    clean.setenv(SCAN_ENV, "1")
    report = mamba_ssm.backend_report(x)
    assert report["selective_scan"] == "torch" and report["causal_conv1d"] == "torch"
    with mamba_ssm.use_backend("ref"):
        assert mamba_ssm.backend_report(x)["selective_scan"] == "ref"
    with mamba_ssm.use_backend("cuda"):  # a choice that cannot run is reported, not raised
        assert mamba_ssm.backend_report(x)["selective_scan"].startswith("error: backend 'cuda' needs CUDA tensors")


def test_one_choice_for_both_packages(clean):
    """The packages share one backend module: one use_backend, one override."""
    x = torch.randn(2, 4, 6)
    assert causal_conv1d.use_backend is mamba_ssm.use_backend
    with causal_conv1d.use_backend("ref"):
        assert which_both(x) == ("ref", "ref")
        with mamba_ssm.use_backend("auto"):  # "auto" undoes an outer choice
            assert which_both(x) == ("torch", "torch")
        assert backends.current_backend() == "ref"
    assert backends.current_backend() == "auto"


def test_query_matches_what_runs(clean, monkeypatch):
    """which_backend names the implementation the next call runs."""
    ran = []
    from mamba_ssm.ops import selective_scan_interface as ssi
    from causal_conv1d import causal_conv1d_interface as cci
    for name in ("torch", "ref"):
        monkeypatch.setitem(ssi.SCAN_IMPLS, name, lambda *a, name=name: ran.append(("scan", name)))
        monkeypatch.setitem(cci.CONV_IMPLS, name, lambda *a, name=name, **k: ran.append(("conv", name)))
    x = torch.randn(2, 4, 6)
    for choice in ("auto", "torch", "ref"):
        with mamba_ssm.use_backend(choice):
            scan_call()
            conv_call(x)
            assert ran[-2:] == [("scan", mamba_ssm.which_backend(x)), ("conv", causal_conv1d.which_backend(x))]


def test_explicit_numba_that_cannot_run_raises(clean, monkeypatch):
    x = torch.randn(2, 64, 6)
    monkeypatch.setattr(scan_backends, "numba_installed", lambda: True)
    with mamba_ssm.use_backend("numba"):
        with pytest.raises(RuntimeError, match="inference only"):
            scan_backends.resolve_scan("cpu", needs_grad=True)
        with pytest.raises(RuntimeError, match="cannot run this call: 5 channels"):
            scan_backends.resolve_scan("cpu", numba_unsupported="5 channels")
        with pytest.raises(RuntimeError, match="CPU"):
            mamba_ssm.which_backend(fake_cuda(x))
        assert causal_conv1d.which_backend(x) == "torch"  # no numba conv kernel: the torch one is part of the path
        monkeypatch.setattr(scan_backends, "_numba_errors", {"fused": "numba failed to import: OSError: boom"})
        with pytest.raises(RuntimeError, match="boom"):
            mamba_ssm.which_backend(x)
    with pytest.raises(RuntimeError, match="boom"):  # a model told numba: raised by set_backend
        make_mixer("v2").set_backend("numba")
    monkeypatch.setenv(env.CPU_BACKEND_ENV, "numba")  # named by the variable: must run, too
    with pytest.raises(RuntimeError, match=f"{env.CPU_BACKEND_ENV}=numba: numba failed to import"):
        mamba_ssm.which_backend(x)
    assert scan_backends.resolve_scan("cpu", needs_grad=True) == "torch"  # the variable picks inference kernels
    monkeypatch.setenv(env.CPU_BACKEND_ENV, "auto")  # auto: the torch kernels, with one warning naming the cause
    with pytest.warns(RuntimeWarning, match="boom") as record:
        assert mamba_ssm.which_backend(x) == "torch"
        assert mamba_ssm.which_backend(x) == "torch"
    assert len(record) == 1


@pytest.mark.parametrize("value", ["jit", "fast", "NUMBA!"])
def test_cpu_backend_variable_is_checked(clean, value):
    clean.setenv(env.CPU_BACKEND_ENV, value)
    with pytest.raises(ValueError, match=f"{env.CPU_BACKEND_ENV} must be one of auto, torch, numba"):
        mamba_ssm.which_backend(torch.randn(1, 32, 2))
    with pytest.raises(ValueError, match=f"{env.CPU_BACKEND_ENV} must be one of"):  # a model's resolution
        make_mixer("v2")


_IMPORT_SCRIPT = """
import importlib.abc, json, sys, warnings

class Refuse(importlib.abc.MetaPathFinder):
    # torchvision/timm raise RuntimeError on this machine; triton is absent on a Pi
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torchvision", "timm", "triton"):
            raise RuntimeError("refused import of " + name)
        return None

sys.meta_path.insert(0, Refuse())
import torch
import causal_conv1d, mamba_ssm
import mamba_ssm.modules.mamba_simple, mamba_ssm.ops.selective_scan_interface
import mamba_ssm.ops.triton.layer_norm, mamba_ssm.ops.triton.layernorm
import mamba_ssm.ops.triton.selective_state_update, mamba_ssm.utils.generation

class FakeCuda(torch.Tensor):
    is_cuda = property(lambda self: True)

result = {"loaded": sorted(m for m in sys.modules
                           if m.split(".")[0] in ("torchvision", "timm", "triton")
                           or m in ("causal_conv1d_cuda", "selective_scan_cuda"))}
m = mamba_ssm.Mamba(8, d_state=4, bimamba_type="v2", if_divide_out=True).eval()
with torch.no_grad():
    result["shape"] = list(m(torch.randn(1, 5, 8)).shape)
fake = torch.Tensor._make_subclass(FakeCuda, torch.zeros(1))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    result["backends"] = [causal_conv1d.which_backend(fake), mamba_ssm.which_backend(fake)]
result["warnings"] = [str(w.message) for w in caught]
try:
    with mamba_ssm.use_backend("cuda"):
        mamba_ssm.which_backend(fake)
    result["cuda_error"] = None
except RuntimeError as error:
    result["cuda_error"] = str(error)
print(json.dumps(result))
"""


def test_import_without_optional_packages_and_with_broken_extensions(tmp_path):
    """Importing and running must not need torchvision/timm/triton, and compiled modules whose
    import raises (a broken CUDA build) must not break the import: calls fall back, with a warning."""
    for name in (CONV_EXT, SCAN_EXT):
        (tmp_path / f"{name}.py").write_text('raise OSError("libcudart.so.12: cannot open shared object file")\n')
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path), "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", _IMPORT_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["loaded"] == []
    assert result["shape"] == [1, 5, 8]
    assert result["backends"] == ["torch", "torch"]
    assert len(result["warnings"]) == 2 and all("FORCE_FALLBACK" in w for w in result["warnings"])
    assert result["cuda_error"] and SCAN_EXT in result["cuda_error"]


def test_packages_build_pure_python_wheels(tmp_path):
    """No compiler, CUDA or triton: each package builds as a py3-none-any wheel of .py files."""
    pytest.importorskip("setuptools")
    wheels = tmp_path / "wheels"
    for project in ("causal-conv1d", "mamba-1p1p1"):
        src = tmp_path / project  # a copy, so the build leaves nothing in the checkout
        shutil.copytree(REPO / project, src, ignore=shutil.ignore_patterns("*.egg-info", "build", "__pycache__"))
        proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                               "--no-index", "-q", "-w", str(wheels), str(src)],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
    built = sorted(p.name for p in wheels.iterdir())
    assert len(built) == 2 and all(name.endswith("-py3-none-any.whl") for name in built), built
    for wheel in wheels.iterdir():
        with zipfile.ZipFile(wheel) as archive:
            names = archive.namelist()
            assert all(n.endswith((".py", ".txt", "METADATA", "WHEEL", "RECORD")) for n in names), names
            metadata = archive.read(next(n for n in names if n.endswith("METADATA"))).decode()
        requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist")]
        assert not any(pkg in line for line in requires for pkg in ("triton", "torchvision", "timm")), requires
