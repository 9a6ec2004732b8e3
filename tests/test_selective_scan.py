"""Selective scan, the fused Mamba inner paths and selective_state_update against float64 oracles.

The oracles (oracles.scan_oracle, inner_oracle) follow the reference doc (section 2) step by step,
in float64:
    dt  = softplus(delta + delta_bias)   (each part optional)
    h_t = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t,   h_0 = 0
    y_t = sum_n h_t * C_t + D * u_t;   y = y * silu(z)
with channel c of a (b, g, n, l) B/C served by group c // (d / g). Agreement is
max|got - want| / max|want|: at most 1e-10 in float64 (stricter than the issue's 1e-5, so a
float64 call computed in float32 fails) and 1e-4 in float32.
"""

import threading

import pytest
import torch
import torch.nn.functional as F

import mamba_ssm.ops.selective_scan_fast as scan_fast_module
from mamba_ssm.ops.selective_scan_interface import (
    bimamba_inner_fn,
    bimamba_inner_fn_no_out_proj,
    bimamba_inner_ref,
    mamba_inner_fn,
    mamba_inner_fn_no_out_proj,
    mamba_inner_ref,
    selective_scan_fast,
    selective_scan_fn,
    selective_scan_ref,
)
from mamba_ssm.ops.triton.selective_state_update import selective_state_update

from kernel_inputs import make_scan_inputs
from oracles import inner_oracle, rel_err, scan_oracle, softplus64

RTOL = {torch.float64: 1e-10, torch.float32: 1e-4}
SCAN_FNS = {"fn": selective_scan_fn, "ref": selective_scan_ref, "fast": selective_scan_fast}


def positive(delta):
    """A delta for runs without softplus (a negative dt would make the scan grow without bound)."""
    return softplus64(delta.double()).to(delta.dtype)


OPTION_SETS = [  # (use D, use z, use delta_bias, delta_softplus); no delta_bias without softplus
    (False, False, False, False), (True, False, False, True), (False, True, True, True),
    (True, True, True, True), (True, True, False, False), (False, False, True, True)]


def call(fn, inputs, use_d, use_z, use_bias, softplus, **kwargs):
    delta = inputs["delta"] if softplus else positive(inputs["delta"])
    return fn(inputs["u"], delta, inputs["A"], inputs["B"], inputs["C"],
              D=inputs["D"] if use_d else None, z=inputs["z"] if use_z else None,
              delta_bias=inputs["delta_bias"] if use_bias else None, delta_softplus=softplus, **kwargs)


@pytest.mark.parametrize("impl", SCAN_FNS)
@pytest.mark.parametrize("b,d,n,l,groups", [
    (1, 1, 1, 1, None), (2, 4, 3, 1, None), (2, 3, 5, 2, None), (1, 6, 4, 3, 2), (3, 4, 2, 13, None),
    (2, 8, 4, 31, 4), (1, 6, 16, 37, 3), (2, 4, 4, 197, 1), (1, 8, 2, 197, 2)])
def test_scan_matches_oracle(impl, b, d, n, l, groups):
    fn = SCAN_FNS[impl]
    option_sets = OPTION_SETS if l < 100 else OPTION_SETS[:1] + OPTION_SETS[3:4]
    for seed, options in enumerate(option_sets):
        for dtype in (torch.float32, torch.float64):
            inputs = make_scan_inputs(b, d, n, l, groups, dtype, seed)
            out, last = call(fn, inputs, *options, return_last_state=True)
            delta = inputs["delta"] if options[3] else positive(inputs["delta"])
            want, want_last = scan_oracle(inputs["u"], delta, inputs["A"], inputs["B"], inputs["C"],
                                          D=inputs["D"] if options[0] else None,
                                          z=inputs["z"] if options[1] else None,
                                          delta_bias=inputs["delta_bias"] if options[2] else None,
                                          delta_softplus=options[3])
            assert out.dtype == dtype and out.shape == (b, d, l)
            assert last.shape == (b, d, n)
            assert rel_err(out, want) <= RTOL[dtype], (seed, options, dtype)
            assert rel_err(last, want_last) <= RTOL[dtype], (seed, options, dtype)
    # without return_last_state only the output comes back
    assert torch.equal(call(fn, inputs, *options), out)


@pytest.mark.parametrize("impl,l", [("fast", 730), ("fast", 1031), ("fn", 1031), ("ref", 730)])
def test_long_sequences(impl, l):
    inputs = make_scan_inputs(2, 4, 3, l, groups=2, seed=l)
    out, last = call(SCAN_FNS[impl], inputs, True, True, True, True, return_last_state=True)
    want, want_last = scan_oracle(**inputs, delta_softplus=True)
    assert rel_err(out, want) <= 1e-4
    assert rel_err(last, want_last) <= 1e-4


@pytest.mark.parametrize("impl", ["fn", "fast"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_chunk_boundaries(monkeypatch, impl, dtype):
    """The fast kernel walks time in chunks of CHUNK_BYTES // (bytes per step): force chunk
    lengths 1, 3 (10 = 3 + 3 + 3 + 1, a partial last chunk), 5 (exact) and one chunk."""
    b, d, n, l = 2, 4, 3, 10
    step_bytes = b * d * n * torch.tensor([], dtype=dtype).element_size()
    for seed, chunk_bytes in enumerate((1, 3 * step_bytes, 5 * step_bytes, 1 << 30)):
        monkeypatch.setattr(scan_fast_module, "CHUNK_BYTES", chunk_bytes)
        inputs = make_scan_inputs(b, d, n, l, None, dtype, seed)
        out, last = call(SCAN_FNS[impl], inputs, True, True, True, True, return_last_state=True)
        want, want_last = scan_oracle(**inputs, delta_softplus=True)
        assert rel_err(out, want) <= RTOL[dtype], chunk_bytes
        assert rel_err(last, want_last) <= RTOL[dtype], chunk_bytes


def test_back_to_back_calls_are_independent():
    """Buffers may be reused across calls: results already returned must not change, and calls
    with other shapes and dtypes in between must not disturb each other."""
    first = make_scan_inputs(2, 4, 3, 40, seed=1)
    out1, last1 = selective_scan_fast(**first, delta_softplus=True, return_last_state=True)
    kept = out1.clone(), last1.clone()
    for b, d, n, l, dtype in ((1, 6, 2, 7, torch.float64), (2, 4, 3, 40, torch.float32), (3, 2, 5, 1, torch.float32),
                              (2, 4, 3, 40, torch.float64)):
        inputs = make_scan_inputs(b, d, n, l, dtype=dtype, seed=l + b)
        out, last = selective_scan_fast(**inputs, delta_softplus=True, return_last_state=True)
        want, want_last = scan_oracle(**inputs, delta_softplus=True)
        assert rel_err(out, want) <= RTOL[dtype] and rel_err(last, want_last) <= RTOL[dtype]
    assert torch.equal(out1, kept[0]) and torch.equal(last1, kept[1])


def test_concurrent_threads(monkeypatch):
    step_bytes = 2 * 8 * 4 * 4
    monkeypatch.setattr(scan_fast_module, "CHUNK_BYTES", 5 * step_bytes)  # 13 chunks of 5 steps
    inputs = [make_scan_inputs(2, 8, 4, 64, seed=seed) for seed in range(3)]
    wants = [scan_oracle(**i, delta_softplus=True)[0] for i in inputs]
    errors = []

    def work(k):
        for _ in range(8):
            errors.append(rel_err(selective_scan_fast(**inputs[k], delta_softplus=True), wants[k]))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(errors) == 24 and max(errors) <= 1e-4


def test_inference_mode_then_no_grad():
    """Calls under torch.inference_mode() must not break later calls outside it."""
    inputs = make_scan_inputs(2, 4, 3, 9, seed=3)
    want, _ = scan_oracle(**inputs, delta_softplus=True)
    with torch.inference_mode():
        assert rel_err(selective_scan_fn(**inputs, delta_softplus=True), want) <= 1e-4
    with torch.no_grad():
        assert rel_err(selective_scan_fn(**inputs, delta_softplus=True), want) <= 1e-4
    assert rel_err(selective_scan_fn(**inputs, delta_softplus=True), want) <= 1e-4


@pytest.mark.parametrize("impl", SCAN_FNS)
def test_large_decay_stays_finite(impl):
    """dt * |A| in the hundreds and beyond (exp underflows to 0), and dt -> 0."""
    b, d, n, l = 2, 4, 8, 24
    gen = torch.Generator().manual_seed(3)
    inputs = make_scan_inputs(b, d, n, l, seed=3)
    inputs["delta"] = torch.rand(b, d, l, generator=gen) * 450 + 50  # softplus(delta) ~ delta
    inputs["delta"][0, 0] = -80.0  # softplus(-80) ~ 1.8e-35: a channel that barely moves
    inputs["A"] = -torch.exp(torch.rand(d, n, generator=gen) * 3) * 2
    out, last = call(SCAN_FNS[impl], inputs, True, True, True, True, return_last_state=True)
    assert torch.isfinite(out).all() and torch.isfinite(last).all()
    want, want_last = scan_oracle(**inputs, delta_softplus=True)
    assert rel_err(out, want) <= 1e-4
    assert rel_err(last, want_last) <= 1e-4
    # the same in float16 inputs (computed in float32)
    half = {k: (v.half() if k in ("u", "z", "B", "C") else v) for k, v in inputs.items()}
    out = call(SCAN_FNS[impl], half, True, True, True, True)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("impl", SCAN_FNS)
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_half_inputs(impl, dtype, tol):
    inputs = make_scan_inputs(2, 6, 4, 37, groups=3, seed=2)
    half = {k: v.to(dtype) if k in ("u", "delta", "z", "B", "C") else v for k, v in inputs.items()}
    out, last = call(SCAN_FNS[impl], half, True, True, True, True, return_last_state=True)
    assert out.dtype == dtype
    want, want_last = scan_oracle(**half, delta_softplus=True)
    # computed in float32: only the final rounding to the half type is lost
    assert rel_err(out, want) <= tol
    assert rel_err(last, want_last) <= 1e-4
    # D and delta_bias in the half type too
    half["D"], half["delta_bias"] = half["D"].to(dtype), half["delta_bias"].to(dtype)
    out = call(SCAN_FNS[impl], half, True, True, True, True)
    assert out.dtype == dtype and rel_err(out, scan_oracle(**half, delta_softplus=True)[0]) <= tol


@pytest.mark.parametrize("impl", SCAN_FNS)
def test_non_contiguous_inputs(impl):
    b, d, n, l = 2, 6, 3, 11
    inputs = make_scan_inputs(b, d, n, l, groups=2, seed=4)
    def channel_last(t):
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)

    def every_other(t):  # stride 2 in the last dim
        return torch.stack((t, t), dim=-1)[..., 0]

    strided = dict(u=channel_last(inputs["u"]), delta=channel_last(inputs["delta"]), z=every_other(inputs["z"]),
                   A=channel_last(inputs["A"]), B=inputs["B"].permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1),
                   C=every_other(inputs["C"]), D=every_other(inputs["D"]),
                   delta_bias=every_other(inputs["delta_bias"]))
    assert not any(t.is_contiguous() for t in strided.values())
    out, last = call(SCAN_FNS[impl], strided, True, True, True, True, return_last_state=True)
    want, want_last = scan_oracle(**inputs, delta_softplus=True)
    assert rel_err(out, want) <= 1e-4 and rel_err(last, want_last) <= 1e-4


@pytest.mark.parametrize("impl", SCAN_FNS)
def test_scan_bad_inputs_name_the_argument(impl):
    fn = SCAN_FNS[impl]
    u, delta, A = torch.zeros(2, 4, 5), torch.zeros(2, 4, 5), -torch.ones(4, 3)
    B = C = torch.zeros(2, 3, 5)
    with pytest.raises(ValueError, match=r"u must have shape \(batch, dim, seqlen\), got \(4, 5\)"):
        fn(u[0], delta[0], A, B, C)
    with pytest.raises(ValueError, match=r"delta must have shape \(batch, dim, seqlen\) = \(2, 4, 5\)"):
        fn(u, delta[..., :4], A, B, C)
    with pytest.raises(ValueError, match=r"A must have shape \(dim, dstate\) = \(4, dstate\), got \(3, 3\)"):
        fn(u, delta, A[:3], B, C)
    with pytest.raises(ValueError, match=r"B must have shape \(batch, dstate, seqlen\) = \(2, 3, 5\)"):
        fn(u, delta, A, B[:, :2], C)
    with pytest.raises(ValueError, match=r"C must have shape .*groups dividing dim=4.*got \(2, 3, 3, 5\)"):
        fn(u, delta, A, B, torch.zeros(2, 3, 3, 5))  # 3 groups do not divide 4 channels
    with pytest.raises(ValueError, match=r"D must have shape \(dim,\) = \(4,\)"):
        fn(u, delta, A, B, C, D=torch.zeros(3))
    with pytest.raises(ValueError, match=r"z must have shape \(batch, dim, seqlen\) = \(2, 4, 5\)"):
        fn(u, delta, A, B, C, z=torch.zeros(2, 4, 6))
    with pytest.raises(ValueError, match=r"delta_bias must have shape \(dim,\) = \(4,\)"):
        fn(u, delta, A, B, C, delta_bias=torch.zeros(4, 1))
    # complex A takes time-varying B/C as (real, imag) pairs: 2 * seqlen columns
    with pytest.raises(ValueError, match=r"B must have shape \(batch, dstate, 2 \* seqlen\) = \(2, 3, 10\)"):
        fn(u, delta, A.to(torch.complex64), B, C)
    with pytest.raises(TypeError, match="u must be a floating-point tensor, got torch.int64"):
        fn(u.long(), delta, A, B, C)
    with pytest.raises(TypeError, match="D must be a floating-point tensor"):
        fn(u, delta, A, B, C, D=torch.zeros(4, dtype=torch.int32))


@pytest.mark.parametrize("groups", [None, 2])
def test_fast_gradcheck(groups):
    inputs = make_scan_inputs(1, 2 if groups is None else 4, 2, 4, groups, torch.float64, seed=6)
    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
    tensors = tuple(inputs[k].requires_grad_() for k in names)
    assert torch.autograd.gradcheck(
        lambda *t: selective_scan_fast(*t[:5], D=t[5], z=t[6], delta_bias=t[7], delta_softplus=True), tensors)
    assert torch.autograd.gradcheck(
        lambda *t: selective_scan_fast(*t[:5], return_last_state=True)[1], tensors[:5])


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_fast_and_ref_gradients_match_oracle(dtype, tol):
    inputs = make_scan_inputs(2, 8, 4, 33, groups=2, dtype=dtype, seed=8)
    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
    cotangent = torch.randn(2, 8, 33, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    leaves64 = [inputs[k].double().requires_grad_() for k in names]
    want, _ = scan_oracle(*leaves64[:5], D=leaves64[5], z=leaves64[6], delta_bias=leaves64[7], delta_softplus=True)
    want_grads = torch.autograd.grad((want * cotangent).sum(), leaves64)
    for fn in (selective_scan_fn, selective_scan_fast, selective_scan_ref):
        leaves = [inputs[k].clone().requires_grad_() for k in names]
        out = fn(*leaves[:5], D=leaves[5], z=leaves[6], delta_bias=leaves[7], delta_softplus=True)
        grads = torch.autograd.grad((out.double() * cotangent).sum(), leaves)
        for name, g, w in zip(names, grads, want_grads):
            assert rel_err(g, w) <= tol, (fn.__name__, name)



def _backward_elements(l):
    """Elements written by all the ops of one backward through the fast scan at length l."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        elements = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            Count.elements += sum(o.numel() for o in torch.utils._pytree.tree_leaves(out) if isinstance(o, torch.Tensor))
            return out

    inputs = make_scan_inputs(1, 8, 4, l, None, torch.float32, seed=9)
    leaves = [inputs[k].requires_grad_() for k in ("u", "delta", "A", "B", "C")]
    out = selective_scan_fast(*leaves)
    with Count():
        out.sum().backward()
    return Count.elements


def test_fast_backward_work_is_linear_in_length():
    """Doubling l doubles what the backward writes (per-step indexing made it quadratic: each
    step's backward wrote a zero tensor as long as the whole sequence, 20 s per Vim-Tiny step)."""
    short, long = _backward_elements(64), _backward_elements(128)
    assert long / short < 2.5, (short, long)

# ---- selective_state_update -----------------------------------------------------------------

def test_state_update_matches_formula_in_place():
    gen = torch.Generator().manual_seed(0)
    b, d, n = 3, 5, 4
    state = torch.randn(b, d, n, generator=gen)
    x, dt, z = (torch.randn(b, d, generator=gen) for _ in range(3))
    A, B, C = -torch.rand(d, n, generator=gen) * 3, torch.randn(b, n, generator=gen), torch.randn(b, n, generator=gen)
    D, dt_bias = torch.randn(d, generator=gen), torch.randn(d, generator=gen)
    for kwargs in (dict(), dict(D=D, z=z), dict(D=D, z=z, dt_bias=dt_bias, dt_softplus=True),
                   dict(dt_softplus=True)):
        s = state.clone()
        delta = dt.double() + (kwargs["dt_bias"].double() if "dt_bias" in kwargs else 0)
        delta = softplus64(delta) if kwargs.get("dt_softplus") else delta
        want_state = torch.exp(delta[..., None] * A.double()) * s.double() \
            + (delta * x.double())[..., None] * B.double()[:, None, :]
        want = (want_state * C.double()[:, None, :]).sum(-1)
        if "D" in kwargs:
            want = want + D.double() * x.double()
        if "z" in kwargs:
            want = want * F.silu(z.double())
        storage = s.data_ptr()
        out = selective_state_update(s, x, dt, A, B, C, **kwargs)
        assert s.data_ptr() == storage and out.shape == (b, d)
        assert rel_err(s, want_state) <= 1e-6 and rel_err(out, want) <= 1e-6


def test_state_updates_reproduce_the_scan():
    inputs = make_scan_inputs(2, 4, 3, 9, None, torch.float64, seed=12)
    want, want_last = scan_oracle(**inputs, delta_softplus=True)
    state = torch.zeros(2, 4, 3, dtype=torch.float64)
    outs = [selective_state_update(state, inputs["u"][..., t], inputs["delta"][..., t], inputs["A"],
                                   inputs["B"][..., t], inputs["C"][..., t], inputs["D"], z=inputs["z"][..., t],
                                   dt_bias=inputs["delta_bias"], dt_softplus=True) for t in range(9)]
    assert rel_err(torch.stack(outs, dim=-1), want) <= 1e-10
    assert rel_err(state, want_last) <= 1e-10


def test_state_update_half_and_bad_shapes():
    state = torch.zeros(2, 4, 3)
    x = torch.randn(2, 4).half()
    out = selective_state_update(state, x, x, -torch.ones(4, 3), torch.ones(2, 3), torch.ones(2, 3))
    assert out.dtype == torch.float16 and state.dtype == torch.float32
    for name, shape in (("x", (2, 5)), ("dt", (4,)), ("A", (3, 4)), ("B", (2, 4)), ("C", (1, 3)), ("z", (2, 3))):
        args = dict(x=torch.zeros(2, 4), dt=torch.zeros(2, 4), A=torch.zeros(4, 3), B=torch.zeros(2, 3),
                    C=torch.zeros(2, 3), z=torch.zeros(2, 4))
        args[name] = torch.zeros(shape)
        with pytest.raises(ValueError, match=rf"{name} must have shape"):
            selective_state_update(state, **args)
    args = dict(x=torch.zeros(2, 4), dt=torch.zeros(2, 4), A=torch.zeros(4, 3), B=torch.zeros(2, 3),
                C=torch.zeros(2, 3))
    for name, value in (("D", torch.zeros(5)), ("dt_bias", torch.zeros(4, 1))):
        with pytest.raises(ValueError, match=rf"{name} must have shape \(4,\)"):
            selective_state_update(state, **args, **{name: value})
    with pytest.raises(ValueError, match=r"state must have shape \(batch, dim, dstate\) or \(batch, nheads, headdim, dstate\), got \(4, 3\)"):
        selective_state_update(state[0], **args)
    with pytest.raises(TypeError, match="state must be a floating-point tensor"):
        selective_state_update(state.long(), **args)  # would silently stay 0


# ---- the fused inner paths ------------------------------------------------------------------

def make_inner_inputs(b=2, d=6, n=4, r=2, l=9, w=4, dtype=torch.float64, seed=0, d_model=5):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    return dict(
        xz=rand(b, 2 * d, l), conv1d_weight=rand(d, 1, w, scale=0.5), conv1d_bias=rand(d, scale=0.5),
        x_proj_weight=rand(r + 2 * n, d, scale=0.5), delta_proj_weight=rand(d, r, scale=0.5),
        out_proj_weight=rand(d_model, d, scale=0.5), out_proj_bias=rand(d_model),
        A=-torch.exp(rand(d, n, scale=0.5)), A_b=-torch.exp(rand(d, n, scale=0.5)), D=rand(d),
        delta_bias=rand(d, scale=0.5), B_proj_bias=rand(n), C_proj_bias=rand(n))


def out_proj64(y, p):
    return F.linear(y.transpose(1, 2), p["out_proj_weight"].double(), p["out_proj_bias"].double())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("proj_bias", [False, True])
def test_inner_paths_match_oracle(dtype, proj_bias):
    for seed, l in enumerate((1, 2, 9, 31)):
        p = make_inner_inputs(l=l, dtype=dtype, seed=seed)
        common = ("xz", "conv1d_weight", "conv1d_bias", "x_proj_weight", "delta_proj_weight")
        extra = dict(D=p["D"], delta_bias=p["delta_bias"])
        if proj_bias:
            extra.update(B_proj_bias=p["B_proj_bias"], C_proj_bias=p["C_proj_bias"])
        y_f = inner_oracle(*(p[k] for k in common), p["A"], **extra)
        y_v1 = inner_oracle(*(p[k] for k in common), p["A"], A_b=p["A_b"], **extra)
        args = [p[k] for k in common]
        out_args = args + [p["out_proj_weight"], p["out_proj_bias"]]
        got = {
            "no_out_proj": (mamba_inner_fn_no_out_proj(*args, p["A"], **extra), y_f),
            "mamba_inner_fn": (mamba_inner_fn(*out_args, p["A"], **extra), out_proj64(y_f, p)),
            "mamba_inner_ref": (mamba_inner_ref(*out_args, p["A"], **extra), out_proj64(y_f, p)),
            "bimamba_inner_fn": (bimamba_inner_fn(*out_args, p["A"], p["A_b"], **extra), out_proj64(y_v1, p)),
            "bimamba_inner_ref": (bimamba_inner_ref(*out_args, p["A"], p["A_b"], **extra), out_proj64(y_v1, p)),
        }
        for name, (out, want) in got.items():
            assert out.dtype == dtype and out.shape == want.shape, name
            assert rel_err(out, want) <= RTOL[dtype], (name, l)


def test_inner_paths_without_softplus_or_d():
    p = make_inner_inputs(seed=5)
    p["delta_bias"] = p["delta_bias"].abs() + 1.0  # keep dt > 0 without softplus
    args = [p[k] for k in ("xz", "conv1d_weight", "conv1d_bias", "x_proj_weight", "delta_proj_weight")]
    want = inner_oracle(*args, p["A"], delta_bias=p["delta_bias"], delta_softplus=False)
    got = mamba_inner_fn_no_out_proj(*args, p["A"], delta_bias=p["delta_bias"], delta_softplus=False)
    assert rel_err(got, want) <= 1e-10


def test_inner_gradients_match_oracle():
    p = make_inner_inputs(l=7, seed=9)
    names = ("xz", "conv1d_weight", "conv1d_bias", "x_proj_weight", "delta_proj_weight", "out_proj_weight",
             "out_proj_bias", "A", "A_b", "D", "delta_bias")
    leaves = {k: p[k].clone().requires_grad_() for k in names}
    cotangent = torch.randn(2, 7, 5, dtype=torch.float64)
    args = [leaves[k] for k in names[:5]]
    want_y = inner_oracle(*args, leaves["A"], D=leaves["D"], delta_bias=leaves["delta_bias"], A_b=leaves["A_b"])
    want = torch.autograd.grad((out_proj64(want_y, leaves) * cotangent).sum(), list(leaves.values()))
    out = bimamba_inner_fn(*args, leaves["out_proj_weight"], leaves["out_proj_bias"], leaves["A"], leaves["A_b"],
                           D=leaves["D"], delta_bias=leaves["delta_bias"])
    got = torch.autograd.grad((out * cotangent).sum(), list(leaves.values()))
    for name, g, w in zip(names, got, want):
        assert rel_err(g, w) <= 1e-10, name


def test_inner_bad_inputs():
    p = make_inner_inputs()
    args = [p[k] for k in ("xz", "conv1d_weight", "conv1d_bias", "x_proj_weight", "delta_proj_weight")]
    with pytest.raises(ValueError, match=r"xz must have shape \(batch, 2 \* dim, seqlen\)"):
        mamba_inner_fn_no_out_proj(args[0][:, :11], *args[1:], p["A"])
    with pytest.raises(ValueError, match=r"conv1d_weight must have shape \(dim, 1, width\) = \(6, 1, width\)"):
        mamba_inner_fn_no_out_proj(args[0], args[1][:, 0], *args[2:], p["A"])
    with pytest.raises(ValueError, match=r"x_proj_weight must have shape \(dt_rank \+ 2 \* dstate, dim\) = \(10, 6\)"):
        mamba_inner_fn_no_out_proj(*args[:3], args[3][:9], args[4], p["A"])
    with pytest.raises(ValueError, match=r"delta_proj_weight must have shape \(dim, dt_rank\)"):
        mamba_inner_fn_no_out_proj(*args[:4], args[4][:5], p["A"])
    with pytest.raises(ValueError, match=r"A must have shape \(dim, dstate\) = \(6, dstate\), got \(6,\)"):
        mamba_inner_fn_no_out_proj(*args, p["A"][:, 0])
    out_args = args + [p["out_proj_weight"], p["out_proj_bias"]]
    for fn in (bimamba_inner_fn, bimamba_inner_ref):  # None would silently run one direction only
        with pytest.raises(ValueError, match="A_b .* is required by the bidirectional inner functions"):
            fn(*out_args, p["A"], None)
        with pytest.raises(ValueError, match=r"A_b must have shape \(dim, dstate\) = \(6, 4\) like A, got \(6, 5\)"):
            fn(*out_args, p["A"], torch.zeros(6, 5, dtype=p["A"].dtype))
    with pytest.raises(ValueError, match="A_b .* is required"):
        bimamba_inner_fn_no_out_proj(*args, p["A"], None)
    for fn in (mamba_inner_fn, mamba_inner_ref):
        with pytest.raises(ValueError, match=r"out_proj_weight must have shape \(d_model, dim\) = \(d_model, 6\)"):
            fn(*args, p["out_proj_weight"][:, :5], None, p["A"])
    with pytest.raises(TypeError, match="xz must be a floating-point tensor"):
        mamba_inner_fn_no_out_proj(args[0].long(), *args[1:], p["A"])


@pytest.mark.parametrize("fn", [selective_scan_fn, selective_scan_ref, selective_scan_fast])
def test_b_and_c_with_different_group_counts_are_refused(fn):
    u = torch.randn(1, 8, 5)
    A = -torch.rand(8, 3)
    with pytest.raises(ValueError, match="same number of groups"):
        fn(u, u, A, torch.randn(1, 2, 3, 5), torch.randn(1, 4, 3, 5))

