"""The rest of upstream's kernel API (causal-conv1d 1.4, mamba 1.1.1 / 2.x's state update) against
float64 formulas (written here; the scan's is oracles.scan_oracle, which takes every B/C form):

- `causal_conv1d_varlen_states` / `_ref`: the last state_len tokens of each packed sequence,
  right-aligned, zeros before a short sequence;
- `selective_state_update` / `_ref` in the single-head and the multi-head form
  (state (b, h, p, n), A (h, p, n), B/C (b, g, n), D and dt_bias (h, p)), with state_batch_indices;
- selective_scan and mamba_inner with time-invariant B/C (d, n) and complex A: with complex A the
  state is complex, y_t = 2 Re(sum_n h_t C_t), and time-varying B/C are real with (real, imag)
  pairs interleaved along the last dim;
- `causal_conv1d_ref` as one formula (its autograd graph does not grow with the length).

Agreement is max|got - want| / max|want| (oracles.rel_err): 1e-10 in float64, 1e-4 in
float32.
"""

import pytest
import torch
import torch.nn.functional as F

import mamba_ssm
import mamba_ssm.ops.selective_scan_fast as scan_fast_module
from causal_conv1d import causal_conv1d_fast, causal_conv1d_fn, causal_conv1d_ref, causal_conv1d_update
from causal_conv1d.causal_conv1d_varlen import causal_conv1d_varlen_states, causal_conv1d_varlen_states_ref
from mamba_ssm.ops.selective_scan_interface import (
    bimamba_inner_fn,
    bimamba_inner_ref,
    mamba_inner_fn,
    mamba_inner_fn_no_out_proj,
    mamba_inner_ref,
    selective_scan_fast,
    selective_scan_fn,
    selective_scan_ref,
)
from mamba_ssm.ops.triton.selective_state_update import selective_state_update, selective_state_update_ref

from kernel_inputs import make_conv_inputs
from oracles import conv_oracle, rel_err, scan_oracle, softplus64

CONV_FNS = {"fn": causal_conv1d_fn, "ref": causal_conv1d_ref, "fast": causal_conv1d_fast}
VARLEN_FNS = {"fast": causal_conv1d_varlen_states, "ref": causal_conv1d_varlen_states_ref}
UPDATE_FNS = {"fast": selective_state_update, "ref": selective_state_update_ref}
SCAN_FNS = {"fn": selective_scan_fn, "ref": selective_scan_ref, "fast": selective_scan_fast}
RTOL = {torch.float64: 1e-10, torch.float32: 1e-4}


def silu64(x):
    return x * torch.sigmoid(x)


# ---- causal_conv1d_ref: one formula ---------------------------------------------------------

def graph_size(t):
    """Number of autograd nodes behind t."""
    seen, todo = set(), [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        todo.extend(next_fn for next_fn, _ in node.next_functions)
    return len(seen)


def test_conv_ref_graph_does_not_grow_with_length():
    """The old reference stacked one output per position (a graph, and a backward, growing with l);
    the formula's graph has the same size for every length, with or without seq_idx."""
    sizes = {}
    for l in (3, 40):
        x, weight, bias, init = (t.requires_grad_() for t in make_conv_inputs(2, 3, l, 4, torch.float64, seed=l))
        seq_idx = (torch.arange(l) >= l // 2).to(torch.int32).expand(2, l)
        sizes[l] = (graph_size(causal_conv1d_ref(x, weight, bias, initial_states=init, activation="silu")),
                    graph_size(causal_conv1d_ref(x, weight, bias, activation="silu", seq_idx=seq_idx)))
    assert sizes[3] == sizes[40]


@pytest.mark.parametrize("impl", CONV_FNS)
def test_conv_width_one(impl):
    """Width 1: no history at all (initial and final states have 0 columns)."""
    fn = CONV_FNS[impl]
    for l in (1, 6):
        x, weight, bias, init = make_conv_inputs(2, 3, l, 1, torch.float64, seed=l)
        assert init.shape == (2, 3, 0)
        out, final = fn(x, weight, bias, initial_states=init, return_final_states=True, activation="silu")
        assert rel_err(out, silu64(weight[:, :1] * x + bias[:, None])) <= 1e-10
        assert final.shape == (2, 3, 0)


# ---- causal_conv1d_varlen_states ------------------------------------------------------------

def varlen_oracle(x, cu_seqlens, state_len):
    """Slot j of sequence i holds token cu[i+1] - state_len + j when that token belongs to
    sequence i, else 0. Returns (b, d, state_len) float64."""
    b, d = len(cu_seqlens) - 1, x.shape[1]
    states = torch.zeros(b, d, state_len, dtype=torch.float64)
    for i in range(b):
        start, end = int(cu_seqlens[i]), int(cu_seqlens[i + 1])
        for j in range(state_len):
            token = end - state_len + j
            if token >= start:
                states[i, :, j] = x[token].double()
    return states


def packed(lengths, d, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(lengths), d, generator=gen).to(dtype)
    cu_seqlens = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0).to(torch.int32)
    return x, cu_seqlens


@pytest.mark.parametrize("impl", VARLEN_FNS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_varlen_states_match_oracle(impl, dtype):
    fn = VARLEN_FNS[impl]
    # sequences shorter than, as long as and longer than the state; empty ones; one token
    lengths = [5, 0, 1, 3, 17, 0, 2, 4]
    x, cu_seqlens = packed(lengths, 6, dtype, seed=1)
    for state_len in (0, 1, 3, 4, 20):
        states = fn(x, cu_seqlens, state_len)
        assert states.shape == (len(lengths), 6, state_len) and states.dtype == dtype
        assert states.transpose(1, 2).is_contiguous()  # upstream's channel-last layout
        torch.testing.assert_close(states.double(), varlen_oracle(x, cu_seqlens, state_len), rtol=0, atol=0)


@pytest.mark.parametrize("impl", VARLEN_FNS)
def test_varlen_states_edge_batches(impl):
    fn = VARLEN_FNS[impl]
    x, _ = packed([4], 3)
    assert fn(x, torch.tensor([0], dtype=torch.int32), 3).shape == (0, 3, 3)  # no sequence at all
    empty = fn(x[:0], torch.tensor([0, 0, 0], dtype=torch.int32), 3)  # only empty sequences
    assert empty.shape == (2, 3, 3) and not empty.any()
    # int64 offsets, and a packed buffer with tokens after the last sequence (ignored)
    states = fn(x, torch.tensor([0, 1, 3], dtype=torch.int64), 2)
    torch.testing.assert_close(states.double(), varlen_oracle(x, [0, 1, 3], 2), rtol=0, atol=0)
    # a strided x (a slice of a wider projection, as in_proj's output is)
    wide, cu_seqlens = packed([3, 5], 10, seed=2)
    states = fn(wide[:, 2:8], cu_seqlens, 4)
    torch.testing.assert_close(states.double(), varlen_oracle(wide[:, 2:8], cu_seqlens, 4), rtol=0, atol=0)


def test_varlen_states_continue_the_conv():
    """With state_len = width - 1 the states are what causal_conv1d_fn / causal_conv1d_update
    continue from: prefill packed sequences, then decode each sequence's next tokens."""
    lengths, d, width = [6, 1, 3], 4, 4
    x, cu_seqlens = packed(lengths, d, torch.float64, seed=3)
    _, weight, bias, _ = make_conv_inputs(1, d, 1, width, torch.float64, seed=4)
    nxt = torch.randn(len(lengths), d, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    for fn in VARLEN_FNS.values():
        states = fn(x, cu_seqlens, width - 1)
        got = causal_conv1d_fn(nxt, weight, bias, initial_states=states, activation="silu")
        conv_state = states.clone()
        stepped = torch.stack([causal_conv1d_update(nxt[..., t], conv_state, weight, bias, "silu")
                               for t in range(2)], dim=-1)
        for i, (start, end) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())):
            whole = torch.cat([x[start:end].T, nxt[i]], dim=-1)[None]  # (1, d, length + 2)
            want = conv_oracle(whole, weight, bias, activation="silu")[0][..., -2:]
            assert rel_err(got[i:i + 1], want) <= 1e-10
            assert rel_err(stepped[i:i + 1], want) <= 1e-10


def test_varlen_states_gradient():
    """Upstream's is forward-only; ours passes gradients to the tokens it copies."""
    x, cu_seqlens = packed([3, 1, 4], 2, torch.float64, seed=6)
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda t: causal_conv1d_varlen_states(t, cu_seqlens, 3), (x,))


@pytest.mark.parametrize("impl", VARLEN_FNS)
def test_varlen_states_bad_inputs(impl):
    fn = VARLEN_FNS[impl]
    x, cu_seqlens = packed([2, 3], 4)
    with pytest.raises(ValueError, match=r"x must have shape \(total_tokens, dim\), got \(1, 5, 4\)"):
        fn(x[None], cu_seqlens, 2)
    with pytest.raises(ValueError, match=r"cu_seqlens must have shape \(batch \+ 1,\), got \(1, 3\)"):
        fn(x, cu_seqlens[None], 2)
    with pytest.raises(TypeError, match="cu_seqlens must be an integer tensor, got torch.float32"):
        fn(x, cu_seqlens.float(), 2)
    for bad in ([0, 3, 2], [0, 2, 6], [-1, 2, 5]):  # unsorted, past the tokens, negative
        with pytest.raises(ValueError, match="cu_seqlens must be sorted"):
            fn(x, torch.tensor(bad, dtype=torch.int32), 2)
    for bad in (-1, 2.0, None):
        with pytest.raises(ValueError, match="state_len must be an int >= 0"):
            fn(x, cu_seqlens, bad)


# ---- selective_state_update -----------------------------------------------------------------

def state_update_oracle(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """float64, multi-head form only, one (batch row, head) pair at a time.

    state (b, h, p, n); x, dt, z (b, h, p); A (h, p, n); B, C (b, g, n); D, dt_bias (h, p).
    Returns out (b, h, p) and the new state.
    """
    b, h, p, n = state.shape
    g = B.shape[1]
    new_state = torch.zeros(b, h, p, n, dtype=torch.float64)
    out = torch.zeros(b, h, p, dtype=torch.float64)
    for i in range(b):
        for k in range(h):
            group = k // (h // g)
            delta = dt[i, k].double() + (0 if dt_bias is None else dt_bias[k].double())
            delta = softplus64(delta) if dt_softplus else delta
            s = torch.exp(delta[:, None] * A[k].double()) * state[i, k].double() \
                + (delta * x[i, k].double())[:, None] * B[i, group].double()[None, :]
            new_state[i, k] = s
            y = s @ C[i, group].double()
            if D is not None:
                y = y + D[k].double() * x[i, k].double()
            if z is not None:
                y = y * silu64(z[i, k].double())
            out[i, k] = y
    return out, new_state


def make_update_inputs(b, h, p, n, g, dtype=torch.float64, tie_hdim=False, seed=0):
    """Upstream's test ranges: dt_bias in [-4, -3], A in [-2, -1]; with tie_hdim, dt, dt_bias, A
    and D are per head, broadcast (stride 0) over the head's channels."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    def uniform(*shape):
        return torch.rand(*shape, generator=gen, dtype=torch.float64)

    if tie_hdim:
        dt = rand(b, h, 1).expand(b, h, p)
        dt_bias = (uniform(h, 1) - 4).expand(h, p)
        A = (-uniform(h, 1, 1) - 1).expand(h, p, n)
        D = rand(h, 1).expand(h, p)
    else:
        dt, dt_bias, A, D = rand(b, h, p), uniform(h, p) - 4, -uniform(h, p, n) - 1, rand(h, p)
    inputs = dict(state=rand(b, h, p, n), x=rand(b, h, p), dt=dt, A=A, B=rand(b, g, n), C=rand(b, g, n),
                  D=D, z=rand(b, h, p), dt_bias=dt_bias)
    return {k: v.to(dtype) for k, v in inputs.items()}


@pytest.mark.parametrize("impl", UPDATE_FNS)
@pytest.mark.parametrize("ngroups", [1, 2, 4])
@pytest.mark.parametrize("tie_hdim", [False, True])
def test_state_update_multi_head(impl, ngroups, tie_hdim):
    fn = UPDATE_FNS[impl]
    for dtype in (torch.float64, torch.float32):
        for seed, (use_d, use_z, use_bias, softplus) in enumerate(
                [(True, True, True, True), (False, False, False, False), (True, False, True, True)]):
            a = make_update_inputs(2, 4, 3, 5, ngroups, dtype, tie_hdim, seed)
            kwargs = dict(D=a["D"] if use_d else None, z=a["z"] if use_z else None,
                          dt_bias=a["dt_bias"] if use_bias else None, dt_softplus=softplus)
            if not softplus:
                a["dt"] = a["dt"].abs()
            want, want_state = state_update_oracle(a["state"], a["x"], a["dt"], a["A"], a["B"], a["C"], **kwargs)
            state = a["state"].clone()
            storage = state.data_ptr()
            out = fn(state, a["x"], a["dt"], a["A"], a["B"], a["C"], **kwargs)
            assert out.shape == (2, 4, 3) and out.dtype == dtype and state.data_ptr() == storage
            assert rel_err(out, want) <= RTOL[dtype], (dtype, seed)
            assert rel_err(state, want_state) <= RTOL[dtype], (dtype, seed)


@pytest.mark.parametrize("impl", UPDATE_FNS)
def test_state_update_single_head_is_one_head(impl):
    """The single-head form is the multi-head one with h = 1, g = 1; per-argument mixes of the
    two forms are accepted where the missing axis is 1 (as upstream unsqueezes each argument)."""
    fn = UPDATE_FNS[impl]
    a = make_update_inputs(3, 1, 6, 4, 1, seed=7)
    want, want_state = state_update_oracle(**a, dt_softplus=True)
    squeezed = {k: v.squeeze(1) if k in ("state", "x", "dt", "z", "B", "C") else v.squeeze(0) for k, v in a.items()}
    state = squeezed.pop("state").clone()
    out = fn(state, **squeezed, dt_softplus=True)
    assert out.shape == (3, 6)
    assert rel_err(out, want[:, 0]) <= 1e-10 and rel_err(state, want_state[:, 0]) <= 1e-10
    # multi-head state, B and C given as (batch, dstate): one group for all heads
    a = make_update_inputs(2, 4, 3, 5, 1, seed=8)
    want, want_state = state_update_oracle(**a)
    state = a["state"].clone()
    out = fn(state, a["x"], a["dt"], a["A"], a["B"][:, 0], a["C"][:, 0], a["D"], a["z"], a["dt_bias"])
    assert rel_err(out, want) <= 1e-10 and rel_err(state, want_state) <= 1e-10


@pytest.mark.parametrize("impl", UPDATE_FNS)
@pytest.mark.parametrize("heads", [False, True])
def test_state_update_batch_indices(impl, heads):
    """state_batch_indices picks the state row of each batch row; -1 marks a padding row: output
    0, no state row touched. Rows not named stay as they were."""
    fn = UPDATE_FNS[impl]
    a = make_update_inputs(4, 2 if heads else 1, 3, 5, 1, seed=9)
    gen = torch.Generator().manual_seed(10)
    pool = torch.randn(9, *a["state"].shape[1:], generator=gen, dtype=torch.float64)
    indices = torch.tensor([6, -1, 0, 3], dtype=torch.int32)
    rows = [6, 0, 3]
    valid = indices >= 0
    want, want_rows = state_update_oracle(pool[indices.clamp(min=0).long()], a["x"], a["dt"], a["A"], a["B"],
                                          a["C"], a["D"], a["z"], a["dt_bias"], True)
    args = {k: v for k, v in a.items() if k != "state"}
    if not heads:
        args = {k: v.squeeze(1) if k in ("x", "dt", "z", "B", "C") else v.squeeze(0) for k, v in args.items()}
    state = pool.clone() if heads else pool.squeeze(1).clone()
    out = fn(state, **args, dt_softplus=True, state_batch_indices=indices)
    out = out if heads else out[:, None]
    state = state if heads else state[:, None]
    assert rel_err(out[valid], want[valid]) <= 1e-10
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert rel_err(state[rows], want_rows[valid]) <= 1e-10
    untouched = [r for r in range(9) if r not in rows]
    assert torch.equal(state[untouched], pool[untouched])


@pytest.mark.parametrize("impl", UPDATE_FNS)
def test_state_update_half_state(impl):
    """A bfloat16 state (upstream's test itypes): computed in float32, written back rounded."""
    fn = UPDATE_FNS[impl]
    a = make_update_inputs(2, 4, 3, 5, 2, seed=11)
    half = {k: v.to(torch.bfloat16) if k in ("state", "x", "dt", "z") else v.float() for k, v in a.items()}
    want, want_state = state_update_oracle(**half, dt_softplus=True)
    state = half.pop("state")
    out = fn(state, **half, dt_softplus=True)
    assert out.dtype == torch.bfloat16 and state.dtype == torch.bfloat16
    assert rel_err(out, want) <= 1.6e-2 and rel_err(state, want_state) <= 1.6e-2


@pytest.mark.parametrize("impl", UPDATE_FNS)
def test_state_update_bad_multi_head_shapes(impl):
    fn = UPDATE_FNS[impl]
    a = make_update_inputs(2, 4, 3, 5, 2, torch.float32)
    state = a.pop("state")
    for name, shape in (("x", (2, 4, 2)), ("dt", (2, 3)), ("A", (4, 3, 4)), ("C", (2, 1, 5)), ("z", (1, 4, 3)),
                        ("D", (4,)), ("dt_bias", (3, 4))):
        bad = dict(a, **{name: torch.zeros(shape)})
        with pytest.raises(ValueError, match=rf"{name} must have shape .* for a state of shape \(2, 4, 3, 5\)"):
            fn(state, **bad)
    with pytest.raises(ValueError, match=r"B must have shape \(batch, ngroups, dstate\) with ngroups dividing nheads=4"):
        fn(state, **dict(a, B=torch.zeros(2, 3, 5), C=torch.zeros(2, 3, 5)))
    with pytest.raises(ValueError, match=r"state must have shape \(batch, dim, dstate\) or \(batch, nheads, headdim"):
        fn(state[None], **a)
    with pytest.raises(ValueError, match=r"state_batch_indices must be a 1-D integer tensor"):
        fn(state, **a, state_batch_indices=torch.zeros(2, 1, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"state_batch_indices must be < 2"):
        fn(state, **a, state_batch_indices=torch.tensor([0, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"x must have shape .* and 3 batch rows"):
        fn(state, **a, state_batch_indices=torch.tensor([0, 1, 1], dtype=torch.int32))
    with pytest.raises(TypeError, match="A must be a floating-point tensor"):
        fn(state, **dict(a, A=a["A"].long()))


# ---- selective scan: time-invariant B/C, complex A ------------------------------------------

# (complex A, B form, C form, groups); forms: "var" (b, [g,] n, l or 2l), "fixed" (d, n) in A's
# dtype, "fixed_real" (d, n) real next to a complex A
SCAN_CASES = [
    (False, "fixed", "var", None), (False, "var", "fixed", 2), (False, "fixed", "fixed", None),
    (True, "var", "var", None), (True, "var", "var", 2), (True, "fixed", "var", None),
    (True, "var", "fixed", None), (True, "fixed_real", "fixed", None)]


def make_general_inputs(b, d, n, l, complex_A, b_form, c_form, groups, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    wdtype = torch.complex128 if complex_A else torch.float64

    def rand(*shape, dt=torch.float64):
        return torch.randn(*shape, generator=gen, dtype=dt)

    def form(kind):
        if kind == "var":
            steps = 2 * l if complex_A else l
            return rand(*((b, n, steps) if groups is None else (b, groups, n, steps)))
        return rand(d, n, dt=wdtype if kind == "fixed" else torch.float64)

    # upstream's ranges: A = -0.5 * rand (complex: both parts), delta in [0, 0.5), delta_bias in [0, 0.5)
    A = -0.5 * torch.rand(d, n, generator=gen, dtype=wdtype)
    inputs = dict(u=rand(b, d, l), delta=0.5 * torch.rand(b, d, l, generator=gen, dtype=torch.float64), A=A,
                  B=form(b_form), C=form(c_form), D=rand(d), z=rand(b, d, l),
                  delta_bias=0.5 * torch.rand(d, generator=gen, dtype=torch.float64))
    real_dtype, cplx_dtype = dtype, (torch.complex64 if dtype == torch.float32 else torch.complex128)
    return {k: v.to(cplx_dtype if v.is_complex() else real_dtype) for k, v in inputs.items()}


@pytest.mark.parametrize("impl", SCAN_FNS)
@pytest.mark.parametrize("complex_A,b_form,c_form,groups", SCAN_CASES)
def test_scan_fixed_bc_and_complex_a(impl, complex_A, b_form, c_form, groups):
    fn = SCAN_FNS[impl]
    for dtype in (torch.float64, torch.float32):
        for seed, (l, options) in enumerate([(1, True), (13, True), (9, False)]):
            a = make_general_inputs(2, 4, 3, l, complex_A, b_form, c_form, groups, dtype, seed)
            extra = dict(D=a["D"], z=a["z"], delta_bias=a["delta_bias"]) if options else {}
            out, last = fn(a["u"], a["delta"], a["A"], a["B"], a["C"], **extra, delta_softplus=options,
                           return_last_state=True)
            want, want_last = scan_oracle(a["u"], a["delta"], a["A"], a["B"], a["C"], **extra,
                                                  delta_softplus=options)
            assert out.dtype == dtype and out.shape == (2, 4, l)
            assert last.shape == (2, 4, 3) and last.is_complex() == complex_A
            assert rel_err(out, want) <= RTOL[dtype], (dtype, l)
            assert rel_err(last, want_last) <= RTOL[dtype], (dtype, l)


@pytest.mark.parametrize("complex_A,b_form,c_form,groups", SCAN_CASES)
def test_scan_fixed_bc_and_complex_a_gradients(complex_A, b_form, c_form, groups):
    """Every input's gradient (complex ones included, in torch's convention) from the fast and the
    reference scan, against the oracle's autograd."""
    a = make_general_inputs(2, 4, 3, 6, complex_A, b_form, c_form, groups, seed=3)
    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
    cotangent = torch.randn(2, 4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    leaves = [a[k].clone().requires_grad_() for k in names]
    want, want_last = scan_oracle(*leaves[:5], D=leaves[5], z=leaves[6], delta_bias=leaves[7],
                                          delta_softplus=True)
    want_grads = torch.autograd.grad((want * cotangent).sum() + want_last.abs().sum(), leaves)
    for fn in SCAN_FNS.values():
        leaves = [a[k].clone().requires_grad_() for k in names]
        out, last = fn(*leaves[:5], D=leaves[5], z=leaves[6], delta_bias=leaves[7], delta_softplus=True,
                       return_last_state=True)
        grads = torch.autograd.grad((out * cotangent).sum() + last.abs().sum(), leaves)
        for name, g, w in zip(names, grads, want_grads):
            assert g.dtype == w.dtype and rel_err(g, w) <= 1e-10, (fn.__name__, name)


@pytest.mark.parametrize("complex_A,b_form,c_form,groups", SCAN_CASES[:4] + SCAN_CASES[5:6])
def test_scan_fixed_bc_and_complex_a_chunks(monkeypatch, complex_A, b_form, c_form, groups):
    """The fast in-place kernel walks time in chunks: 1-step chunks, 3-step chunks (a partial last
    one) and a single chunk, in the layouts these forms use."""
    a = make_general_inputs(2, 4, 3, 10, complex_A, b_form, c_form, groups, seed=5)
    want, want_last = scan_oracle(**a, delta_softplus=True)
    for chunk_bytes in (1, 3 * 2 * 4 * 3 * 16, 1 << 30):
        monkeypatch.setattr(scan_fast_module, "CHUNK_BYTES", chunk_bytes)
        with torch.no_grad():
            out, last = selective_scan_fast(**a, delta_softplus=True, return_last_state=True)
        assert rel_err(out, want) <= 1e-10 and rel_err(last, want_last) <= 1e-10, chunk_bytes


@pytest.mark.parametrize("impl", SCAN_FNS)
def test_scan_bad_b_c_forms_name_the_argument(impl):
    fn = SCAN_FNS[impl]
    u, delta = torch.zeros(2, 4, 5), torch.zeros(2, 4, 5)
    A, A_c = -torch.ones(4, 3), -torch.ones(4, 3, dtype=torch.complex64)
    B = torch.zeros(2, 3, 5)
    with pytest.raises(ValueError, match=r"C must have shape .* or \(dim, dstate\) = \(4, 3\) when time-invariant, "
                                         r"got \(3, 4\)"):
        fn(u, delta, A, B, torch.zeros(3, 4))
    with pytest.raises(TypeError, match="B is complex but A is real"):
        fn(u, delta, A, torch.zeros(4, 3, dtype=torch.complex64), B)
    with pytest.raises(TypeError, match=r"C must be real when it varies in time, got torch.complex64"):
        fn(u, delta, A_c, torch.zeros(2, 3, 10), torch.zeros(2, 3, 5, dtype=torch.complex64))
    with pytest.raises(ValueError, match=r"C must have shape \(batch, dstate, 2 \* seqlen\) = \(2, 3, 10\)"):
        fn(u, delta, A_c, torch.zeros(2, 3, 10), B)
    with pytest.raises(TypeError, match="z must be a real floating-point tensor, got torch.complex64"):
        fn(u, delta, A_c, torch.zeros(4, 3), torch.zeros(4, 3), z=u.to(torch.complex64))


# ---- mamba_inner: time-invariant B/C, complex A ---------------------------------------------

def general_inner_oracle(p, B=None, C=None, delta_softplus=True):
    """float64 inner path + out_proj for any B/C given or projected: x_proj_weight's rows are
    [dt_rank; B's block if B is None; C's block if C is None], a block being n rows (2n with
    complex A: (real, imag) per state, which makes the (b, n, 2l) pairs layout)."""
    x, z = p["xz"].double().chunk(2, dim=1)
    xc, _ = conv_oracle(x, p["conv1d_weight"][:, 0], p["conv1d_bias"], activation="silu")
    A = p["A"]
    r = p["delta_proj_weight"].shape[1]
    x_dbl = torch.einsum("bdl,ed->ble", xc, p["x_proj_weight"].double())
    delta = torch.einsum("blr,dr->bdl", x_dbl[..., :r], p["delta_proj_weight"].double())
    m = A.shape[1] * (2 if A.is_complex() else 1)
    blocks = iter(x_dbl[..., r + k * m:r + (k + 1) * m] for k in range(2))

    def projected():
        cols = next(blocks)  # (b, l, m)
        if not A.is_complex():
            return cols.transpose(1, 2)
        b, l, _ = cols.shape
        pairs = cols.reshape(b, l, m // 2, 2)  # (b, l, n, (real, imag))
        return pairs.permute(0, 2, 1, 3).reshape(b, m // 2, 2 * l)

    B = projected() if B is None else B
    C = projected() if C is None else C
    y, _ = scan_oracle(xc, delta, A, B, C, p["D"], z, p["delta_bias"], delta_softplus)
    bias = p["out_proj_bias"]
    return F.linear(y.transpose(1, 2), p["out_proj_weight"].double(), None if bias is None else bias.double())


INNER_CASES = [(False, True, False), (False, False, True), (False, True, True), (True, False, False),
               (True, True, False)]  # (complex A, B given (d, n), C given (d, n))


def make_general_inner_inputs(complex_A, fixed_B, fixed_C, b=2, d=6, n=3, r=2, l=7, w=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    wdtype = torch.complex128 if complex_A else torch.float64

    def rand(*shape, scale=1.0, dt=torch.float64):
        return torch.randn(*shape, generator=gen, dtype=dt) * scale

    rows = r + ((not fixed_B) + (not fixed_C)) * n * (2 if complex_A else 1)
    return dict(
        xz=rand(b, 2 * d, l), conv1d_weight=rand(d, 1, w, scale=0.5), conv1d_bias=rand(d, scale=0.5),
        x_proj_weight=rand(rows, d, scale=0.5), delta_proj_weight=rand(d, r, scale=0.5),
        out_proj_weight=rand(5, d, scale=0.5), out_proj_bias=rand(5),
        A=-0.5 * torch.rand(d, n, generator=gen, dtype=wdtype), B=rand(d, n, dt=wdtype) if fixed_B else None,
        C=rand(d, n, dt=wdtype) if fixed_C else None, D=rand(d), delta_bias=0.5 * torch.rand(d, generator=gen,
                                                                                          dtype=torch.float64))


INNER_ARGS = ("xz", "conv1d_weight", "conv1d_bias", "x_proj_weight", "delta_proj_weight")


@pytest.mark.parametrize("complex_A,fixed_B,fixed_C", INNER_CASES)
def test_inner_fixed_bc_and_complex_a(complex_A, fixed_B, fixed_C):
    p = make_general_inner_inputs(complex_A, fixed_B, fixed_C)
    want = general_inner_oracle(p, p["B"], p["C"])
    args = [p[k] for k in INNER_ARGS]
    kwargs = dict(B=p["B"], C=p["C"], D=p["D"], delta_bias=p["delta_bias"])
    outs = {"mamba_inner_fn": mamba_inner_fn(*args, p["out_proj_weight"], p["out_proj_bias"], p["A"], **kwargs),
            "mamba_inner_ref": mamba_inner_ref(*args, p["out_proj_weight"], p["out_proj_bias"], p["A"], **kwargs),
            "no_out_proj": F.linear(mamba_inner_fn_no_out_proj(*args, p["A"], **kwargs).transpose(1, 2),
                                    p["out_proj_weight"], p["out_proj_bias"])}
    with mamba_ssm.use_backend("ref"):
        outs["mamba_inner_fn (ref backend)"] = mamba_inner_fn(*args, p["out_proj_weight"], p["out_proj_bias"],
                                                              p["A"], **kwargs)
    for name, out in outs.items():
        assert out.shape == (2, 7, 5) and rel_err(out, want) <= 1e-10, name


@pytest.mark.parametrize("complex_A,fixed_B,fixed_C", [INNER_CASES[0], INNER_CASES[3], INNER_CASES[4]])
def test_inner_fixed_bc_and_complex_a_gradients(complex_A, fixed_B, fixed_C):
    p = make_general_inner_inputs(complex_A, fixed_B, fixed_C, l=5, seed=1)
    names = [k for k in INNER_ARGS + ("out_proj_weight", "out_proj_bias", "A", "B", "C", "D", "delta_bias")
             if p[k] is not None]
    cotangent = torch.randn(2, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    leaves = {k: p[k].clone().requires_grad_() for k in names}
    full = dict(p, **leaves)
    want = torch.autograd.grad((general_inner_oracle(full, full["B"], full["C"]) * cotangent).sum(),
                               list(leaves.values()))
    for fn in (mamba_inner_fn, mamba_inner_ref):
        leaves = {k: p[k].clone().requires_grad_() for k in names}
        full = dict(p, **leaves)
        out = fn(*(full[k] for k in INNER_ARGS), full["out_proj_weight"], full["out_proj_bias"], full["A"],
                 B=full["B"], C=full["C"], D=full["D"], delta_bias=full["delta_bias"])
        got = torch.autograd.grad((out * cotangent).sum(), list(leaves.values()))
        for name, g, w in zip(names, got, want):
            assert rel_err(g, w) <= 1e-10, (fn.__name__, name)


def test_inner_bad_projection_rows_name_the_layout():
    p = make_general_inner_inputs(False, True, False)
    args = [p[k] for k in INNER_ARGS]
    with pytest.raises(ValueError, match=r"x_proj_weight must have shape \(dt_rank \+ dstate, dim\) = \(5, 6\), "
                                         r"got \(5, 5\)"):
        mamba_inner_fn_no_out_proj(*args[:3], args[3][:, :5], args[4], p["A"], B=p["B"])
    with pytest.raises(ValueError, match=r"x_proj_weight must have shape \(dt_rank, dim\) = \(2, 6\), got \(5, 6\)"):
        mamba_inner_fn_no_out_proj(*args, p["A"], B=p["B"], C=p["B"])
    with pytest.raises(ValueError, match=r"x_proj_weight must have shape \(dt_rank \+ 2 \* dstate, dim\) = \(8, 6\)"):
        mamba_inner_fn_no_out_proj(*args, p["A"])  # both projected: one block too few
    p = make_general_inner_inputs(True, False, False)
    args = [p[k] for k in INNER_ARGS]
    with pytest.raises(ValueError, match=r"x_proj_weight must have shape \(dt_rank \+ 4 \* dstate, dim\) = \(14, 6\)"):
        mamba_inner_ref(*args[:3], args[3][:8], args[4], p["out_proj_weight"], None, p["A"])


def test_bidirectional_inner_refuses_complex_a_and_fixed_bc():
    """Upstream's bimamba kernel refuses complex A, and flipping a (d, n) B/C or (real, imag) pairs
    along the last dim is not a time reversal: refused rather than guessed."""
    p = make_general_inner_inputs(False, True, False)
    args = [p[k] for k in INNER_ARGS] + [p["out_proj_weight"], p["out_proj_bias"]]
    for fn in (bimamba_inner_fn, bimamba_inner_ref):
        with pytest.raises(NotImplementedError, match=r"time-invariant B \(dim, dstate\) is not supported by the "
                                                      r"bidirectional inner functions"):
            fn(*args, p["A"], p["A"], B=p["B"])
        q = make_general_inner_inputs(True, False, False)
        with pytest.raises(NotImplementedError, match="complex A or A_b is not supported"):
            fn(*[q[k] for k in INNER_ARGS], q["out_proj_weight"], q["out_proj_bias"], q["A"], q["A"])


# ---- upstream's own test grids, on the CPU at small sizes -----------------------------------

@pytest.mark.parametrize("wtype", [torch.float32, torch.complex64])
@pytest.mark.parametrize("itype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("is_variable_B,is_variable_C,varBC_groups", [
    (True, True, 1), (True, True, 2), (False, True, 1), (True, False, 1), (False, False, 1)])
def test_upstream_selective_scan_grid(wtype, itype, is_variable_B, is_variable_C, varBC_groups):
    """upstream tests/ops/test_selective_scan.py::test_selective_scan's inputs (dim 4, dstate 8,
    B/C dtype wtype when time-invariant, itype when time-varying, 2l columns with complex wtype),
    fn against ref with gradients, at seqlen 16 instead of 128..4096."""
    torch.manual_seed(0)
    batch, dim, dstate, seqlen = 2, 4, 8, 16
    steps = seqlen * (2 if wtype == torch.complex64 else 1)
    A = (-0.5 * torch.rand(dim, dstate, dtype=wtype)).requires_grad_()

    def bc(variable):
        shape = (batch, dstate, steps) if varBC_groups == 1 else (batch, varBC_groups, dstate, steps)
        return torch.randn(*shape, dtype=itype) if variable else torch.randn(dim, dstate, dtype=wtype)

    B, C = bc(is_variable_B).requires_grad_(), bc(is_variable_C).requires_grad_()
    D = torch.randn(dim, requires_grad=True)
    z = torch.randn(batch, dim, seqlen, dtype=itype, requires_grad=True)
    delta_bias = (0.5 * torch.rand(dim)).requires_grad_()
    u = torch.randn(batch, dim, seqlen, dtype=itype, requires_grad=True)
    delta = (0.5 * torch.rand(batch, dim, seqlen, dtype=itype)).requires_grad_()
    leaves = (u, delta, A, B, C, D, z, delta_bias)
    results = []
    for fn in (selective_scan_fn, selective_scan_ref):
        out, state = fn(u, delta, A, B, C, D, z=z, delta_bias=delta_bias, delta_softplus=True,
                        return_last_state=True)
        grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
        results.append((out, state, grads))
    (out, state, grads), (out_ref, state_ref, grads_ref) = results
    rtol, atol = (6e-4, 2e-3) if itype == torch.float32 else (3e-2, 5e-2)
    assert torch.allclose(out, out_ref, rtol=rtol, atol=atol) and torch.allclose(state, state_ref, rtol=rtol, atol=atol)
    for g, g_ref in zip(grads, grads_ref):
        assert torch.allclose(g, g_ref, rtol=rtol * 5, atol=atol * 10)
    # and both against the float64 oracle
    with torch.no_grad():
        want, _ = scan_oracle(u, delta, A, B, C, D, z, delta_bias, True)
    assert rel_err(out, want) <= (1e-4 if itype == torch.float32 else 1.6e-2)


@pytest.mark.parametrize("wtype", [torch.float32, torch.complex64])
@pytest.mark.parametrize("is_variable_B", [False, True])
@pytest.mark.parametrize("is_variable_C", [False, True])
def test_upstream_mamba_inner_grid(wtype, is_variable_B, is_variable_C):
    """upstream test_mamba_inner_fn's inputs (x_proj_weight with dt_rank + (varB + varC) * dstate
    * (2 if complex) rows, B/C (dim, dstate) of dtype wtype when given), mamba_inner_fn against
    mamba_inner_ref with gradients, at dim 16, dt_rank 4, seqlen 8 instead of 768, 48, 128."""
    torch.manual_seed(0)
    batch, dim, dstate, dt_rank, seqlen = 2, 16, 8, 4, 8
    is_complex = wtype == torch.complex64
    p = dict(xz=torch.randn(batch, 2 * dim, seqlen), conv1d_weight=torch.randn(dim, 1, 3),
             conv1d_bias=torch.randn(dim),
             x_proj_weight=torch.randn(dt_rank + (is_variable_B + is_variable_C) * dstate * (2 if is_complex else 1),
                                       dim),
             delta_proj_weight=torch.randn(dim, dt_rank), out_proj_weight=torch.randn(dim // 2, dim),
             out_proj_bias=None, A=-0.5 * torch.rand(dim, dstate, dtype=wtype),
             B=None if is_variable_B else torch.randn(dim, dstate, dtype=wtype),
             C=None if is_variable_C else torch.randn(dim, dstate, dtype=wtype),
             D=torch.randn(dim), delta_bias=0.5 * torch.rand(dim))
    results = []
    for fn in (mamba_inner_fn, mamba_inner_ref):
        leaves = {k: v.clone().requires_grad_() for k, v in p.items() if v is not None}
        q = dict(p, **leaves)
        out = fn(q["xz"], q["conv1d_weight"], q["conv1d_bias"], q["x_proj_weight"], q["delta_proj_weight"],
                 q["out_proj_weight"], q["out_proj_bias"], q["A"], q["B"], q["C"], q["D"],
                 delta_bias=q["delta_bias"], delta_softplus=True)
        results.append((out, torch.autograd.grad(out, list(leaves.values()), torch.ones_like(out))))
    (out, grads), (out_ref, grads_ref) = results
    assert torch.allclose(out, out_ref, rtol=6e-4, atol=2e-3)
    for g, g_ref in zip(grads, grads_ref):
        assert torch.allclose(g, g_ref, rtol=6e-4, atol=2e-3 * max(1.0, g_ref.abs().max().item()))
    with torch.no_grad():
        want = general_inner_oracle(p, p["B"], p["C"])
    assert rel_err(out, want) <= 1e-4
