"""The fused numba kernels of the v2 mixer (`mamba_ssm.ops.bimamba_v2_numba`) against float64.

Oracles: `test_mamba_module.mixer_oracle` (one mixer, from its parameters) and
`vim_reference.vim_forward` (a whole Vim). float32 results must be within 1e-4 (max abs error
over max abs value) of them. Every call here is checked to have run the fused kernels (not the
torch path). Skipped without numba (the main suite runs without it); the
broken-numba checks run in fresh processes with a stand-in numba package.
"""

import copy
import importlib.util
import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
import torch.nn.functional as F

import mamba_ssm
from mamba_ssm import Mamba, env
from mamba_ssm.ops import bimamba_v2_numba as fused
from test_causal_conv1d import rel_err
from test_mamba_module import mixer_oracle, params64
from test_selective_scan import inner_oracle

pytestmark = pytest.mark.skipif(importlib.util.find_spec("numba") is None, reason="numba not installed")
TOL = 1e-4


@pytest.fixture(autouse=True)
def numba_backend(monkeypatch):
    monkeypatch.setenv(env.CPU_BACKEND_ENV, "numba")


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts calls of the fused entry point (auto runs the torch kernels where it cannot run)."""
    calls = []
    real = fused.bimamba_v2_numba
    monkeypatch.setattr(fused, "bimamba_v2_numba", lambda *a: calls.append(a) or real(*a))
    return calls


def mixer(d_model, d_state=4, seed=0, scale=0.2, **kwargs):
    """A float32 v2 mixer in eval mode with every parameter perturbed (the directions differ)."""
    torch.manual_seed(seed)
    m = Mamba(d_model, d_state=d_state, bimamba_type="v2", layer_idx=0, **kwargs)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * scale)
    return m.eval()


def hidden(b, l, d_model, seed=1):
    return torch.randn(b, l, d_model, generator=torch.Generator().manual_seed(seed))


def forward(m, h, threads=1):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            return m(h)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("b,l,d_model,d_state,kwargs", [
    (1, 1, 8, 4, {}),  # one token
    (2, 3, 8, 4, {}),  # fewer tokens than the conv width (4)
    (3, 7, 24, 16, dict(conv_bias=False)),  # d_inner 48: one partial channel block; no conv bias
    (2, 40, 40, 3, dict(bias=True)),  # odd state size, Linear biases
    (1, 197, 64, 16, {}),  # Vim's token count, d_inner 128
    (4, 20, 104, 16, dict(if_divide_out=False)),  # d_inner 208: several blocks, batch rows split
])
@pytest.mark.parametrize("threads", [1, 2])
def test_mixer_matches_float64_oracle(fused_calls, b, l, d_model, d_state, kwargs, threads):
    kwargs.setdefault("if_divide_out", True)
    m = mixer(d_model, d_state, **kwargs)
    h = hidden(b, l, d_model)
    got = forward(m, h, threads)
    assert len(fused_calls) == 1 and got.dtype == torch.float32 and got.shape == h.shape
    assert rel_err(got, mixer_oracle(params64(m), h, "v2", kwargs["if_divide_out"])) <= TOL


def test_huge_decays_stay_finite(fused_calls):
    """dt * |A| in the thousands: exp underflows to 0, nothing overflows."""
    m = mixer(16, d_state=8, if_divide_out=True)
    with torch.no_grad():
        m.A_log.add_(6.0)  # |A| ~ 400
        m.dt_proj_b.bias.add_(8.0)  # dt ~ 8 backward
    h = hidden(2, 30, 16)
    got = forward(m, h)
    assert fused_calls and torch.isfinite(got).all()
    assert rel_err(got, mixer_oracle(params64(m), h, "v2", True)) <= TOL


def test_nan_propagates_where_the_oracle_has_it(fused_calls):
    """A NaN in A (a diverged A_log) or in one token poisons what the float64 formula poisons,
    compared before out_proj (which would mix every channel into every output)."""
    m = mixer(8, if_divide_out=True)
    with torch.no_grad():
        m.A_b_log[3, 1] = float("nan")
    h = hidden(2, 9, 8)
    h[1, 4, 2] = float("nan")
    seen = []
    m.out_proj.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    forward(m, h)
    p = params64(m)
    xz = F.linear(h.double(), p["in_proj.weight"]).transpose(1, 2)

    def direction(xz, s):  # mixer_oracle's, which a matmul with an identity out_proj would spread NaN from
        return inner_oracle(xz, p[f"conv1d{s}.weight"], p[f"conv1d{s}.bias"], p[f"x_proj{s}.weight"],
                            p[f"dt_proj{s}.weight"], -torch.exp(p[f"A{s}_log"]), D=p[f"D{s}"],
                            delta_bias=p[f"dt_proj{s}.bias"])

    want = ((direction(xz, "") + direction(xz.flip(-1), "_b").flip(-1)) / 2).transpose(1, 2)  # (b, l, d_inner)
    got = seen[0]
    assert fused_calls and torch.isnan(want).any() and not torch.isnan(want).all()
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert rel_err(got.nan_to_num(), want.nan_to_num()) <= TOL


def test_concurrent_calls_from_two_threads(fused_calls):
    """Each call has its own task, scratch and outputs: results are bit-identical to serial ones."""
    cases = [(mixer(24, 16, seed=i, if_divide_out=True), hidden(i + 1, 50 + 7 * i, 24, seed=i)) for i in range(2)]
    serial = [forward(m, h) for m, h in cases]
    results, errors = [[], []], []

    def work(i):
        try:
            for _ in range(15):
                results[i].append(forward(*cases[i], threads=2))
        except Exception as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(torch.equal(r, serial[i]) for i in range(2) for r in results[i])
    assert len(fused_calls) == 2 + 30


def test_whole_vim_matches_float64_reference(fused_calls):
    import vim_rpi
    from vim_reference import vim_forward

    torch.manual_seed(0)
    model = vim_rpi.create_model("vim_tiny", depth=3, embed_dim=48, img_size=64, stride=8).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x = torch.randn(2, 3, 64, 64)
    want = vim_forward({k: v.double() for k, v in model.state_dict().items()}, x.double(), patch=16, stride=8)
    got = forward(model, x, threads=2)
    assert len(fused_calls) == 3
    assert rel_err(got, want) <= TOL


def test_quantized_projections_match_the_torch_path(fused_calls):
    """Dynamic-int8 Linear layers: x_proj stays a (quantized) torch matmul; dt_proj's weights are
    dequantized into the scan, whose input is not quantized then. The torch path computes the
    same with float dt_proj layers holding those weights."""
    from mamba_ssm.modules.mamba_simple import dense_linear

    m = torch.ao.quantization.quantize_dynamic(mixer(32, 16, if_divide_out=True), {torch.nn.Linear}, torch.qint8)
    h = hidden(2, 25, 32)
    got = forward(m, h)
    assert fused_calls
    for name in ("dt_proj", "dt_proj_b"):
        weight, bias = dense_linear(getattr(m, name))
        dense = torch.nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            dense.weight.copy_(weight)
            dense.bias.copy_(bias)
        setattr(m, name, dense)
    assert rel_err(got, forward(m.set_backend("torch"), h)) <= TOL


def test_declined_calls_take_the_torch_path(fused_calls):
    m = mixer(8, if_divide_out=True)
    h = hidden(2, 5, 8)
    want = mixer_oracle(params64(m), h, "v2", True)
    out = m(h.requires_grad_())  # autograd: training keeps the torch path
    out.sum().backward()
    assert rel_err(out.detach(), want) <= TOL
    m64 = mixer(8, if_divide_out=True).double()
    assert rel_err(forward(m64, h.detach().double()), want) <= 1e-10  # float64: torch path
    assert not fused_calls
    assert mamba_ssm.kernel_report(m64)["mixer"] == "torch" and mamba_ssm.kernel_report(m)["mixer"] == "numba"


def test_entry_points_refuse_activations_they_cannot_read():
    """Called directly, the kernels check the activations (they read raw float32 memory)."""
    m = mixer(8, if_divide_out=True)
    with torch.no_grad():
        m(hidden(1, 3, 8))  # builds the held weights
    w = m._constants.stacked
    args = (w.conv_weight, w.conv_bias, w.x_proj, w.dt_weight, w.dt_bias, w.A, w.D, True)
    xz = torch.randn(1, 3, 2 * m.d_inner)
    with torch.no_grad():
        with pytest.raises(ValueError, match="float32 CPU tensors, got xz torch.float64"):
            fused.bimamba_v2_numba(xz.double(), *args)
        with pytest.raises(ValueError, match="got residual torch.float16"):
            fused.add_rms_norm(xz, xz.half(), torch.ones(xz.shape[-1]), 1e-5)
    with pytest.raises(ValueError, match="inference only"):
        fused.bimamba_v2_numba(xz.requires_grad_(), *args)


@pytest.mark.parametrize("shape", [(1, 1, 8), (2, 37, 48), (1, 197, 192)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_add_rms_norm_matches_float64(shape, with_residual):
    gen = torch.Generator().manual_seed(shape[1])
    x, residual, weight = (torch.randn(*s, generator=gen) for s in (shape, shape, shape[-1:]))
    residual = residual if with_residual else None
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out, s = fused.add_rms_norm(x, residual, weight, 1e-5)
    finally:
        torch.set_num_threads(old)
    want_s = x.double() + (0 if residual is None else residual.double())
    want = want_s / torch.sqrt(want_s.pow(2).mean(-1, keepdim=True) + 1e-5) * weight.double()
    assert rel_err(s, want_s) <= 1e-7 and rel_err(out, want) <= 1e-6
    assert (s is x) == (residual is None)


def test_block_runs_the_fused_norm_in_eval_mode(monkeypatch):
    from mamba_ssm.modules.mamba_simple import Block
    from mamba_ssm.ops.triton.layer_norm import RMSNorm, rms_norm_fn

    calls = []
    real = fused.add_rms_norm
    monkeypatch.setattr(fused, "add_rms_norm", lambda *a: calls.append(a) or real(*a))
    torch.manual_seed(0)
    block = Block(16, lambda d: Mamba(d, d_state=4, bimamba_type="v2", if_divide_out=True),
                  norm_cls=lambda d: RMSNorm(d, eps=1e-5), fused_add_norm=True, residual_in_fp32=True).eval()
    with torch.no_grad():
        block.norm.weight.add_(torch.randn(16))
    h, r = hidden(2, 11, 16), hidden(2, 11, 16, seed=2)
    with torch.inference_mode():
        got, got_residual = block(h, r)
        with mamba_ssm.use_backend("torch"):  # the formula (a function call)
            want_norm, want_residual = rms_norm_fn(h, block.norm.weight, None, residual=r, eps=1e-5, prenorm=True)
        want = copy.deepcopy(block.mixer).set_backend("torch")(want_norm)  # the torch mixer
    assert len(calls) == 1
    assert rel_err(got_residual, want_residual) <= 1e-7 and rel_err(got, want) <= TOL
    block.train()
    block(h, r)
    assert len(calls) == 1  # training keeps the torch path


# ---- start-up and failures, in fresh processes ---------------------------------------------------

def _python(code, tmp_path, extra_path=None):
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    environ["NUMBA_CACHE_DIR"] = str(tmp_path / "cache")
    environ[env.CPU_BACKEND_ENV] = "numba"
    if extra_path:
        environ["PYTHONPATH"] = str(extra_path)
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=environ, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


STAND_INS = {
    "import": {"numba/__init__.py": "raise ImportError('stand-in numba: broken install')"},
    "compile": {
        "numba/__init__.py": """
            from numba.core import types
            def cfunc(signature, **options):
                def compile(function):
                    raise RuntimeError('stand-in numba: cannot compile ' + function.__name__)
                return compile
            def carray(*args):
                raise AssertionError('never called')
        """,
        "numba/core/__init__.py": "",
        "numba/core/types.py": """
            class _Type:
                def __call__(self, *args):
                    return _Type()
            def __getattr__(name):
                return _Type()
        """,
        "numba/extending.py": """
            def intrinsic(function):
                return function
            def overload(function, **options):
                return lambda implementation: implementation
            def register_jitable(function):
                return function
        """,
    },
}


@pytest.mark.parametrize("failure,cause", [("import", "ImportError: stand-in numba: broken install"),
                                           ("compile", "RuntimeError: stand-in numba: cannot compile conv")])
def test_broken_numba_is_reported_once_in_one_line(tmp_path, failure, cause):
    """load_error() names the cause (the backend module warns with it and keeps the torch path);
    calling the kernels anyway raises RuntimeError with it; nothing is cached."""
    for name, text in STAND_INS[failure].items():
        path = tmp_path / "stand-in" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    code = """
        import torch
        from mamba_ssm.ops import bimamba_v2_numba as fused
        print(fused.load_error())
        print(fused.load_error() == fused.load_error())
        try:
            fused.bimamba_v2_numba(torch.zeros(1, 2, 8), *[None] * 8)
        except RuntimeError as e:
            print(e)
    """
    assert _python(code, tmp_path, tmp_path / "stand-in").splitlines() == [
        cause, "True", f"the fused numba kernels are unavailable ({cause})"]
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("failure,cause", [("import", "ImportError: stand-in numba: broken install"),
                                           ("compile", "RuntimeError: stand-in numba: cannot compile conv")])
def test_broken_numba_runs_the_torch_path_with_one_warning(tmp_path, failure, cause):
    """Under the default backend a model built with a broken numba resolves the torch kernels, with
    one RuntimeWarning naming the cause however many models and calls follow."""
    for name, text in STAND_INS[failure].items():
        path = tmp_path / "stand-in" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    code = """
        import copy, os, warnings
        import torch
        from mamba_ssm import Mamba
        os.environ["SELECTIVE_SCAN_CPU_BACKEND"] = "auto"
        torch.manual_seed(0)
        x = torch.randn(1, 9, 16)
        with warnings.catch_warnings(record=True) as caught, torch.inference_mode():
            warnings.simplefilter("always")
            m = Mamba(16, d_state=4, bimamba_type="v2", if_divide_out=True).eval()
            copy.deepcopy(m).eval()
            got = [m(x), m(x)]
            want = copy.deepcopy(m).set_backend("torch")(x)
        print(len(caught), caught[0].message if caught else None)
        print(all(torch.equal(g, want) for g in got))
    """
    lines = _python(code, tmp_path, tmp_path / "stand-in").splitlines()
    assert lines[0].startswith("1 numba kernels unavailable") and cause in lines[0]
    assert lines[1] == "True"


def test_a_model_told_numba_refuses_autograd_and_runs_inference(fused_calls):
    m = mixer(16, if_divide_out=True).set_backend("numba")
    h = hidden(1, 5, 16)
    with pytest.raises(RuntimeError, match="inference only"):
        m(h)  # autograd on: the numba kernels cannot record it, and nothing falls back
    got = forward(m, h)
    assert len(fused_calls) == 1 and rel_err(got, mixer_oracle(params64(m), h, "v2", True)) <= TOL
    assert mamba_ssm.kernel_report(m, "autograd")["mixer"] == "refused"
