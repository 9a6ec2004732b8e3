"""The CPU inference scan kernels behind the fast path, against a float64 step-by-step oracle.

Two kernels share the state-(n, d) `scan_state_nd` contract: the pure-PyTorch chunked one
(`selective_scan_fast`) and the optional fused numba one (`selective_scan_numba`), chosen by
`mamba_ssm.ops.backends` (SELECTIVE_SCAN_CPU_BACKEND=auto|torch|numba). Both are checked here
with D, an initial state, broadcast batch dims, chunk boundaries, huge decays and concurrent
threads; numba cases skip when numba is absent.
"""

import subprocess
import sys
import threading

import importlib.util

import pytest
import torch

import mamba_ssm
import mamba_ssm.ops.selective_scan_fast as fast
from causal_conv1d.causal_conv1d_interface import conv_taps
from mamba_ssm import Mamba, env, use_backend
from mamba_ssm.ops import backends
from mamba_ssm.ops.selective_scan_interface import numba_scan_state_nd, selective_scan_fn
from test_causal_conv1d import rel_err
from test_selective_scan import make_scan_inputs, scan_oracle

HAS_NUMBA = importlib.util.find_spec("numba") is not None
KERNELS = {"torch": fast.scan_state_nd, "numba": numba_scan_state_nd}
BACKENDS = ["torch", pytest.param("numba", marks=pytest.mark.skipif(not HAS_NUMBA, reason="numba not installed"))]
TOL = {torch.float32: 2e-5, torch.float64: 1e-12}


def oracle(dt, x, At, B, C, D=None, h0=None):
    """float64, one step at a time: h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t; y_t = C_t h_t + D x_t.
    dt, x (l, *batch, d); At (*batch, n, d); B, C (l, *batch, n). Returns y, h_l."""
    dt, x, At, B, C = (t.double() for t in (dt, x, At, B, C))
    batch = dt.shape[1:-1]
    h = torch.zeros(batch + At.shape[-2:], dtype=torch.float64) if h0 is None else h0.double().expand(
        batch + At.shape[-2:]).clone()
    ys = []
    for t in range(dt.shape[0]):
        h = torch.exp(dt[t, ..., None, :] * At) * h + (dt[t] * x[t])[..., None, :] * B[t][..., None]
        y = (C[t][..., None] * h).sum(-2)
        ys.append(y if D is None else y + D.double() * x[t])
    return torch.stack(ys), h


def inputs(l, batch, n, d, dtype, seed, decay=1.0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    dt = torch.nn.functional.softplus(rand(l, *batch, d) - 1.0) * decay
    At = -torch.exp(rand(*batch[:-1], 1, n, d) * 0.5)  # broadcast over the last batch dim
    out = dict(dt=dt, x=rand(l, *batch, d), At=At, B=rand(l, *batch, n), C=rand(l, *batch, n),
               D=rand(batch[0], 1, d), h0=rand(*batch, n, d))
    return {k: v.to(dtype) for k, v in out.items()}


@pytest.fixture
def backend(request):
    """The `scan_state_nd` kernel named by the parameter."""
    return KERNELS[request.param]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("l,batch,d", [(1, (2, 1), 32), (7, (1, 3), 96), (197, (2, 1), 64), (20, (2, 2), 48)])
def test_matches_oracle(backend, dtype, l, batch, d):
    t = inputs(l, batch, 4, d, dtype, seed=l + d)
    if backend is numba_scan_state_nd and d % 32:
        with pytest.raises(ValueError, match=f"cannot take {d} channels per scan"):
            backend(t["dt"], t["x"], t["At"], t["B"], t["C"])
        return
    for D, h0 in ((None, None), (t["D"], t["h0"])):
        y, last = backend(t["dt"], t["x"], t["At"], t["B"], t["C"], D, h0)
        want_y, want_last = oracle(t["dt"], t["x"], t["At"], t["B"], t["C"], D, h0)
        assert y.shape == want_y.shape and last.shape == want_last.shape
        assert y.dtype == dtype
        assert rel_err(y, want_y) <= TOL[dtype]
        assert rel_err(last, want_last) <= TOL[dtype]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_huge_decays_stay_finite(backend):
    """dt * |A| in the hundreds: exp underflows to 0, nothing overflows."""
    t = inputs(30, (2, 1), 16, 32, torch.float32, seed=1, decay=200.0)
    y, last = backend(t["dt"], t["x"], t["At"], t["B"], t["C"], t["D"], t["h0"])
    want_y, want_last = oracle(t["dt"], t["x"], t["At"], t["B"], t["C"], t["D"], t["h0"])
    assert torch.isfinite(y).all() and torch.isfinite(last).all()
    assert rel_err(y, want_y) <= 1e-5 and rel_err(last, want_last) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_nan_and_overflow_show_as_in_torch_exp(backend):
    """A NaN in A (a diverged A_log) poisons exactly the channel the oracle poisons (from the
    second step: the kernels skip the first step's product with the zero initial state); an
    exponent past float32's range gives inf, not a large finite number."""
    t = inputs(6, (2, 1), 4, 32, torch.float32, seed=3)
    At = t["At"].clone()
    At[0, 0, 1, 5] = float("nan")
    y, last = backend(t["dt"], t["x"], At, t["B"], t["C"], t["D"])
    want_y, want_last = oracle(t["dt"], t["x"], At, t["B"], t["C"], t["D"])
    assert torch.equal(torch.isnan(y[1:]), torch.isnan(want_y[1:])) and torch.isnan(y[1:, 0, 0, 5]).all()
    assert torch.equal(torch.isnan(last), torch.isnan(want_last))
    dt, x, B, C, h0 = t["dt"][:1], torch.zeros_like(t["x"][:1]), t["B"][:1], t["C"][:1], torch.ones_like(t["h0"])
    At = torch.full_like(t["At"], -1.0)
    At[1, 0, 2, 7] = 1e4  # exp(dt * 1e4) overflows float32
    At[1, 0, 3, 8] = 88.5 / float(dt[0, 1, 0, 8])  # exp(88.5) = 2.7e38: just below float32's maximum
    _, last = backend(dt, x, At, B, C, None, h0)  # one step from h0 = 1: last = exp(dt A)
    assert torch.isinf(last[1, 0, 2, 7]) and torch.isfinite(last[0]).all()
    want = torch.exp(dt[0].double().unsqueeze(-2) * At.double())
    assert abs(float(last[1, 0, 3, 8]) / float(want[1, 0, 3, 8]) - 1) < 1e-5


def test_torch_kernel_chunk_boundaries_and_shape_changes(monkeypatch):
    """Chunk lengths 1, 3 (10 = 3+3+3+1) and 5 exercise both halves of the reused state buffer;
    the workspace is rebuilt when the shape changes and gives the same results."""
    small = inputs(10, (2, 1), 3, 8, torch.float64, seed=2)
    other = inputs(9, (1, 2), 3, 16, torch.float64, seed=3)
    step_bytes = 2 * 3 * 8 * 8
    for chunk in (1, 3, 5):
        monkeypatch.setattr(fast, "CHUNK_BYTES", chunk * step_bytes)
        for t in (small, other, small):
            y, last = fast.scan_state_nd(t["dt"], t["x"], t["At"], t["B"], t["C"], t["D"], t["h0"])
            want_y, want_last = oracle(t["dt"], t["x"], t["At"], t["B"], t["C"], t["D"], t["h0"])
            assert rel_err(y, want_y) <= 1e-12 and rel_err(last, want_last) <= 1e-12, chunk


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_concurrent_threads_get_their_own_buffers(backend):
    cases = [inputs(25, (2, 1), 4, 32 * (i + 1), torch.float32, seed=i) for i in range(2)]
    wants = [oracle(t["dt"], t["x"], t["At"], t["B"], t["C"], t["D"])[0] for t in cases]
    errors = []

    def work(t, want):
        for _ in range(20):
            y, _ = backend(t["dt"], t["x"], t["At"], t["B"], t["C"], t["D"])
            errors.append(rel_err(y, want))

    threads = [threading.Thread(target=work, args=pair) for pair in zip(cases, wants)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(errors) == 40 and max(errors) <= TOL[torch.float32]


def test_buffers_made_in_inference_mode_work_outside_it():
    t = inputs(12, (2, 1), 4, 8, torch.float32, seed=4)
    args = (t["dt"], t["x"], t["At"], t["B"], t["C"])
    with torch.inference_mode():
        first, _ = fast.scan_state_nd(*args)
    with torch.no_grad():
        second, _ = fast.scan_state_nd(*args)
    assert torch.equal(first, second)


def test_autograd_path_matches_and_has_gradients():
    t = inputs(6, (2, 1), 3, 16, torch.float64, seed=5)
    dt = t["dt"].requires_grad_()
    y, last = fast.scan_state_nd(dt, t["x"], t["At"], t["B"], t["C"], t["D"], t["h0"])
    want_y, want_last = oracle(t["dt"].detach(), t["x"], t["At"], t["B"], t["C"], t["D"], t["h0"])
    assert rel_err(y.detach(), want_y) <= 1e-12 and rel_err(last.detach(), want_last) <= 1e-12
    (y.sum() + last.sum()).backward()
    assert dt.grad is not None and torch.isfinite(dt.grad).all()


@pytest.mark.parametrize("value,expected", [(None, None), ("", None), ("auto", None), (" Torch ", "torch")])
def test_cpu_backend_variable(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv(env.CPU_BACKEND_ENV, raising=False)
    else:
        monkeypatch.setenv(env.CPU_BACKEND_ENV, value)
    expected = expected or ("numba" if HAS_NUMBA else "torch")
    assert mamba_ssm.which_backend(torch.randn(1, 32, 2)) == expected
    mixer = Mamba(16, d_state=4, bimamba_type="v2")  # a model reads the variable when it resolves its kernels
    assert mamba_ssm.kernel_report(mixer)["mixer"] == expected


def test_cpu_backend_numba_not_installed(monkeypatch):
    monkeypatch.setattr(backends, "numba_installed", lambda: False)
    monkeypatch.setenv(env.CPU_BACKEND_ENV, "numba")
    with pytest.raises(RuntimeError, match="pip install numba"):
        mamba_ssm.which_backend(torch.randn(1, 32, 2))
    monkeypatch.setenv(env.CPU_BACKEND_ENV, "auto")
    assert mamba_ssm.which_backend(torch.randn(1, 32, 2)) == "torch"


@pytest.mark.skipif(not HAS_NUMBA, reason="numba not installed")
def test_numba_takes_only_calls_it_supports(monkeypatch):
    from mamba_ssm.ops import selective_scan_numba

    assert backends.numba_error("scan") is None  # loaded (its probe call made) before counting
    calls = []
    real = selective_scan_numba.scan_state_nd
    monkeypatch.setattr(selective_scan_numba, "scan_state_nd", lambda *a: calls.append(a) or real(*a))
    ok = make_scan_inputs(2, 32, 3, 5, seed=6)
    odd = make_scan_inputs(2, 48, 3, 5, seed=7)  # 48 channels: not a multiple of 32
    for setting, t, taken in (("numba", ok, 1), ("auto", ok, 1), ("torch", ok, 0), ("numba", odd, 0)):
        monkeypatch.setenv(env.CPU_BACKEND_ENV, setting)
        calls.clear()
        y = selective_scan_fn(**t, delta_softplus=True)
        assert len(calls) == taken, setting
        assert rel_err(y, scan_oracle(**t, delta_softplus=True)[0]) <= 1e-5
    monkeypatch.setenv(env.CPU_BACKEND_ENV, "numba")
    calls.clear()
    selective_scan_fn(**{**ok, "u": ok["u"].clone().requires_grad_()}, delta_softplus=True)  # autograd: torch
    assert not calls
    with use_backend("numba"), pytest.raises(RuntimeError, match="48 channels per group"):
        selective_scan_fn(**odd)  # asked for by use_backend: an error, not a silent fallback


@pytest.mark.skipif(not HAS_NUMBA, reason="numba not installed")
def test_numba_keeps_the_torch_thread_count():
    """numba's OpenMP pool shares torch's OpenMP runtime and resets its thread count when it
    starts (once per process, so a fresh process)."""
    code = ("import torch\n"
            "from mamba_ssm.ops import selective_scan_numba as sn\n"
            "torch.set_num_threads(1)\n"
            "t = torch.rand(3, 2, 32)\n"
            "sn.scan_state_nd(t, t, -torch.rand(2, 4, 32), torch.rand(3, 2, 4), torch.rand(3, 2, 4))\n"
            "print(torch.get_num_threads())\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "1"


@pytest.mark.parametrize("name", ["torch", pytest.param("numba", marks=pytest.mark.skipif(not HAS_NUMBA,
                                                                                          reason="numba not installed"))])
def test_v2_mixer_fast_path_matches_reference_path(name):
    """A whole bidirectional block (d_inner 64) on the fast path against the sequential `_ref`
    kernels in float64 (the torch path; the fused numba kernels are float32 only and refuse
    float64 by name, when the model is told), and float32 against that float64 result."""
    torch.manual_seed(0)
    mixer = Mamba(32, bimamba_type="v2", if_divide_out=True).double().eval()
    hidden = torch.randn(2, 23, 32, dtype=torch.float64)
    with torch.no_grad():
        want = mixer.set_backend("ref")(hidden)
        if name == "torch":
            assert rel_err(mixer.set_backend("torch")(hidden), want) <= 1e-12
        else:
            with pytest.raises(RuntimeError, match="float32 activations and weights on the CPU only"):
                mixer.set_backend("numba")
            assert mamba_ssm.kernel_report(mixer)["backend"] == "ref"  # refused: unchanged
            mixer.float().set_backend("numba")
        got32 = mixer.float()(hidden.float())
        assert mamba_ssm.kernel_report(mixer)["mixer"] == name
    assert rel_err(got32, want) <= 1e-5


def test_conv_taps_layouts():
    """Channel-last x and weights stored either (d, w) or (w, d) give the same causal conv,
    laid out channel-last like x."""
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(2, 3, 11, 8, generator=gen, dtype=torch.float64).transpose(-1, -2)  # (2, 3, d=8, l=11)
    weight = torch.randn(2, 1, 8, 4, generator=gen, dtype=torch.float64)
    bias = torch.randn(2, 1, 8, generator=gen, dtype=torch.float64)
    xpad = torch.nn.functional.pad(x, (3, 0))
    want = bias[..., None] + sum(weight[..., k:k + 1] * xpad[..., k:k + 11] for k in range(4))
    for w in (weight, weight.transpose(-1, -2).contiguous().transpose(-1, -2)):
        out = conv_taps(x, w, bias)
        assert rel_err(out, want) <= 1e-14
        assert out.stride(-2) == 1  # channel-last, like x


def test_broadcast_helper():
    assert fast._broadcast((2, 1, 4), (3, 1), ()) == (2, 3, 4)
    assert fast._broadcast((5,), (1,)) == (5,)
    with pytest.raises(ValueError, match="do not broadcast"):
        fast._broadcast((2, 3), (4, 3))
