"""causal_conv1d: the public functions and both pure-PyTorch kernels against a float64 oracle.

The oracle (oracles.conv_oracle) is written from the definition (reference doc section 2), not
from the package:
    out[:, c, t] = bias[c] + sum_k weight[c, k] * xpad[:, c, t + k]
with xpad = [initial_states or zeros (w-1 columns), x]. Agreement is measured as
max|got - want| / max|want| (relative to the largest reference value), at most 1e-10 in float64
(stricter than the issue's 1e-5, so a float64 call silently computed in float32 fails) and 1e-4
in float32.
"""

import pytest
import torch

from causal_conv1d import (
    causal_conv1d_fast,
    causal_conv1d_fn,
    causal_conv1d_ref,
    causal_conv1d_update,
    causal_conv1d_update_fast,
    causal_conv1d_update_ref,
)

from kernel_inputs import make_conv_inputs
from oracles import conv_oracle, rel_err

RTOL = {torch.float64: 1e-10, torch.float32: 1e-4}
CONV_FNS = {"fn": causal_conv1d_fn, "ref": causal_conv1d_ref, "fast": causal_conv1d_fast}
UPDATE_FNS = {"fn": causal_conv1d_update, "ref": causal_conv1d_update_ref, "fast": causal_conv1d_update_fast}


@pytest.mark.parametrize("impl", CONV_FNS)
@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("seqlen", [1, 2, 3, 5, 13, 197])
def test_conv_matches_oracle(impl, width, seqlen):
    fn = CONV_FNS[impl]
    cases = [(use_bias, act) for use_bias in (False, True) for act in (None, "silu", "swish")]
    for seed, (use_bias, act) in enumerate(cases):
        for dtype in (torch.float32, torch.float64):
            x, weight, bias, _ = make_conv_inputs(2, 5, seqlen, width, dtype, seed)
            bias = bias if use_bias else None
            out = fn(x, weight, bias, activation=act)
            want, _ = conv_oracle(x, weight, bias, activation=act)
            assert out.dtype == dtype and out.shape == x.shape
            assert rel_err(out, want) <= RTOL[dtype], (seed, use_bias, act, dtype)


@pytest.mark.parametrize("impl", CONV_FNS)
@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("seqlen", [1, 2, 3, 7])
def test_initial_and_final_states(impl, width, seqlen):
    fn = CONV_FNS[impl]
    x, weight, bias, init = make_conv_inputs(3, 4, seqlen, width, torch.float64, seed=seqlen * 10 + width)
    want, want_final = conv_oracle(x, weight, bias, initial_states=init, activation="silu")
    out, final = fn(x, weight, bias, initial_states=init, return_final_states=True, activation="silu")
    assert rel_err(out, want) <= 1e-10
    assert final.shape == (3, 4, width - 1)
    torch.testing.assert_close(final, want_final, rtol=0, atol=0)

    # without initial states the history is zeros, and the final states still come back
    want, want_final = conv_oracle(x, weight, bias)
    out, final = fn(x, weight, bias, return_final_states=True)
    assert rel_err(out, want) <= 1e-10
    torch.testing.assert_close(final, want_final, rtol=0, atol=0)

    # final_states_out is filled in place and returned
    buffer = torch.full((3, 4, width - 1), float("nan"), dtype=torch.float64)
    out, final = fn(x, weight, bias, initial_states=init, return_final_states=True, final_states_out=buffer)
    assert final is buffer
    torch.testing.assert_close(buffer, conv_oracle(x, weight, bias, initial_states=init)[1], rtol=0, atol=0)


def test_chained_calls_with_states_equal_one_call():
    x, weight, bias, _ = make_conv_inputs(2, 6, 20, 4, torch.float64, seed=3)
    want, _ = conv_oracle(x, weight, bias, activation="silu")
    for fn in CONV_FNS.values():
        pieces, state = [], None
        for lo, hi in ((0, 1), (1, 3), (3, 11), (11, 20)):
            out, state = fn(x[..., lo:hi], weight, bias, initial_states=state, return_final_states=True,
                            activation="silu")
            pieces.append(out)
        assert rel_err(torch.cat(pieces, dim=-1), want) <= 1e-10


@pytest.mark.parametrize("impl", CONV_FNS)
def test_seq_idx_blocks_other_sequences(impl):
    fn = CONV_FNS[impl]
    gen = torch.Generator().manual_seed(7)
    for width in (2, 3, 4):
        x, weight, bias, _ = make_conv_inputs(3, 4, 17, width, torch.float64, seed=width)
        # sorted segment ids with segments of length 1 and longer, different per row
        seq_idx = torch.randint(0, 3, (3, 17), generator=gen).cumsum(-1).to(torch.int32)
        want, _ = conv_oracle(x, weight, bias, activation="silu", seq_idx=seq_idx)
        out = fn(x, weight, bias, seq_idx=seq_idx, activation="silu")
        assert rel_err(out, want) <= 1e-10
        # a constant seq_idx changes nothing
        out = fn(x, weight, bias, seq_idx=torch.zeros(3, 17, dtype=torch.int32))
        assert rel_err(out, conv_oracle(x, weight, bias)[0]) <= 1e-10


@pytest.mark.parametrize("impl", CONV_FNS)
def test_non_contiguous_inputs(impl):
    fn = CONV_FNS[impl]
    gen = torch.Generator().manual_seed(11)
    x_last = torch.randn(2, 19, 6, generator=gen)  # channel-last storage, as in_proj produces it
    x = x_last.transpose(1, 2)
    x_strided = torch.randn(2, 6, 38, generator=gen)[..., ::2]
    weight = torch.randn(4, 6, generator=gen).t()  # (6, 4), non-contiguous
    bias = torch.randn(12, generator=gen)[::2]
    init = torch.randn(2, 3, 6, generator=gen).transpose(1, 2)
    for inp in (x, x_strided):
        assert not inp.is_contiguous()
        out = fn(inp, weight, bias, initial_states=init, activation="silu")
        want, _ = conv_oracle(inp, weight, bias, initial_states=init, activation="silu")
        assert rel_err(out, want) <= 1e-4


@pytest.mark.parametrize("impl", CONV_FNS)
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_half_inputs_keep_their_dtype(impl, dtype, tol):
    fn = CONV_FNS[impl]
    x, weight, bias, init = make_conv_inputs(2, 8, 23, 4, torch.float32, seed=5)
    x, init = x.to(dtype), init.to(dtype)
    out, final = fn(x, weight, bias, initial_states=init, return_final_states=True, activation="silu")
    assert out.dtype == dtype and final.dtype == dtype
    want, want_final = conv_oracle(x, weight, bias, initial_states=init, activation="silu")
    # float32 weights: computed in float32, so only the final rounding to the half type is lost
    assert rel_err(out, want) <= tol
    torch.testing.assert_close(final.double(), want_final, rtol=0, atol=0)
    # all-half inputs compute in the weight's (half) dtype: looser, but still the same function
    out = fn(x, weight.to(dtype), bias.to(dtype), activation="silu")
    assert out.dtype == dtype
    assert rel_err(out, conv_oracle(x, weight.to(dtype), bias.to(dtype), activation="silu")[0]) <= 8 * tol


@pytest.mark.parametrize("impl", CONV_FNS)
def test_bad_inputs_name_the_argument(impl):
    fn = CONV_FNS[impl]
    x, weight, bias, init = make_conv_inputs(2, 4, 9, 4)
    with pytest.raises(ValueError, match=r"x must have shape \(batch, dim, seqlen\), got \(4, 9\)"):
        fn(x[0], weight)
    with pytest.raises(ValueError, match=r"weight must have shape \(dim, width\) = \(4, width\), got \(3, 4\)"):
        fn(x, weight[:3])
    with pytest.raises(ValueError, match=r"weight must have shape .*got \(4, 1, 4\)"):
        fn(x, weight[:, None])  # the Conv1d layout must be squeezed first
    with pytest.raises(ValueError, match=r"bias must have shape \(dim,\) = \(4,\), got \(5,\)"):
        fn(x, weight, torch.zeros(5))
    with pytest.raises(ValueError, match=r"initial_states must have shape \(batch, dim, width - 1\) = \(2, 4, 3\)"):
        fn(x, weight, bias, initial_states=init[..., :2])
    with pytest.raises(ValueError, match=r"final_states_out must have shape .* = \(2, 4, 3\)"):
        fn(x, weight, bias, return_final_states=True, final_states_out=torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match=r"seq_idx must have shape \(batch, seqlen\) = \(2, 9\)"):
        fn(x, weight, seq_idx=torch.zeros(2, 8, dtype=torch.int32))
    for bad in ("relu", "gelu", True):
        with pytest.raises(NotImplementedError, match="activation must be None, 'silu' or 'swish'"):
            fn(x, weight, bias, activation=bad)
    # integer tensors would be truncated silently: refused, naming the argument
    with pytest.raises(TypeError, match="weight must be a floating-point tensor, got torch.int64"):
        fn(x, weight.long())
    with pytest.raises(TypeError, match="x must be a floating-point tensor, got torch.int32"):
        fn(x.int(), weight)
    with pytest.raises(TypeError, match="final_states_out must be a floating-point tensor"):
        fn(x, weight, bias, return_final_states=True, final_states_out=torch.zeros(2, 4, 3, dtype=torch.long))


def test_ref_and_fast_autograd_match_oracle_gradients():
    x, weight, bias, init = make_conv_inputs(2, 3, 11, 4, torch.float64, seed=2)
    tensors = [t.clone().requires_grad_() for t in (x, weight, bias, init)]
    cotangent = torch.randn(2, 3, 11, dtype=torch.float64)
    want = torch.autograd.grad((conv_oracle(*tensors[:3], initial_states=tensors[3], activation="silu")[0]
                                * cotangent).sum(), tensors)
    for fn in (causal_conv1d_ref, causal_conv1d_fast):
        got = torch.autograd.grad((fn(*tensors[:3], initial_states=tensors[3], activation="silu")
                                   * cotangent).sum(), tensors)
        for g, w in zip(got, want):
            assert rel_err(g, w) <= 1e-10


def test_fast_gradcheck():
    x, weight, bias, init = (t.requires_grad_() for t in make_conv_inputs(1, 2, 5, 3, torch.float64, seed=9))
    assert torch.autograd.gradcheck(
        lambda *a: causal_conv1d_fast(a[0], a[1], a[2], initial_states=a[3], activation="silu"),
        (x, weight, bias, init))
    seq_idx = torch.tensor([[0, 0, 1, 1, 1]], dtype=torch.int32)
    assert torch.autograd.gradcheck(
        lambda *a: causal_conv1d_fast(*a, seq_idx=seq_idx), (x, weight, bias))


# ---- causal_conv1d_update -------------------------------------------------------------------

def update_oracle(x, conv_state, weight, bias=None, activation=None, cache_seqlens=None):
    """float64 decoding step from the contract, plus the expected new state.

    x (b, d, l); conv_state (b, d, s). Without cache_seqlens the history is the last w-1 state
    columns and the new state is the last s columns of [state, x]. With cache_seqlens (b,), row j's
    history is slots (c_j - (w-1) .. c_j - 1) mod s and input i is written to slot (c_j + i) mod s.
    Returns out (b, d, l) and new_state (b, d, s), float64.
    """
    b, d, l = x.shape
    w, s = weight.shape[1], conv_state.shape[2]
    state = conv_state.double().clone()
    if cache_seqlens is None:
        history = state[:, :, s - (w - 1):]
        new_state = torch.cat([state, x.double()], dim=-1)[:, :, -s:]
    else:
        history = torch.stack([state[j][:, [(int(c) - (w - 1) + k) % s for k in range(w - 1)]]
                               for j, c in enumerate(cache_seqlens)])
        new_state = state.clone()
        for j, c in enumerate(cache_seqlens):
            for i in range(l):
                new_state[j, :, (int(c) + i) % s] = x[j, :, i].double()
    out, _ = conv_oracle(x, weight, bias, initial_states=history, activation=activation)
    return out, new_state


@pytest.mark.parametrize("impl", UPDATE_FNS)
@pytest.mark.parametrize("width", [2, 3, 4])
def test_update_shift_register(impl, width):
    fn = UPDATE_FNS[impl]
    gen = torch.Generator().manual_seed(width)
    b, d = 3, 5
    weight, bias = torch.randn(d, width, generator=gen), torch.randn(d, generator=gen)
    for state_len in (width - 1, width, width + 3):
        for seqlen in (None, 1, 2, 5):
            x = torch.randn(b, d, seqlen or 1, generator=gen)
            state = torch.randn(b, d, state_len, generator=gen)
            want, want_state = update_oracle(x, state, weight, bias, "silu")
            out = fn(x[..., 0] if seqlen is None else x, state, weight, bias, "silu")
            assert out.shape == ((b, d) if seqlen is None else (b, d, seqlen))
            assert rel_err(out, want[..., 0] if seqlen is None else want) <= 1e-4
            torch.testing.assert_close(state.double(), want_state, rtol=0, atol=0)


@pytest.mark.parametrize("impl", UPDATE_FNS)
def test_update_circular_buffer(impl):
    fn = UPDATE_FNS[impl]
    gen = torch.Generator().manual_seed(4)
    b, d, width, state_len = 4, 3, 4, 6
    weight, bias = torch.randn(d, width, generator=gen), torch.randn(d, generator=gen)
    # per-row offsets, including ones whose history and writes wrap around the buffer end
    cache_seqlens = torch.tensor([0, 2, 5, 13], dtype=torch.int32)
    for seqlen in (None, 1, 3, 6):
        x = torch.randn(b, d, seqlen or 1, generator=gen)
        state = torch.randn(b, d, state_len, generator=gen)
        want, want_state = update_oracle(x, state, weight, bias, None, cache_seqlens)
        out = fn(x[..., 0] if seqlen is None else x, state, weight, bias, None, cache_seqlens)
        assert rel_err(out, want[..., 0] if seqlen is None else want) <= 1e-4
        torch.testing.assert_close(state.double(), want_state, rtol=0, atol=0)


@pytest.mark.parametrize("impl", UPDATE_FNS)
@pytest.mark.parametrize("circular", [False, True])
def test_update_steps_equal_full_conv(impl, circular):
    """Decoding a sequence in pieces reproduces the conv over the whole sequence."""
    fn = UPDATE_FNS[impl]
    x, weight, bias, _ = make_conv_inputs(2, 4, 23, 4, torch.float64, seed=8)
    want, _ = conv_oracle(x, weight, bias, activation="silu")
    state = torch.zeros(2, 4, 5, dtype=torch.float64)
    seqlens = torch.zeros(2, dtype=torch.int32) if circular else None
    pieces, t = [], 0
    for size in (1, 1, 3, 2, 5, 1, 4, 1, 5):  # total 23: the 5-slot buffer wraps several times
        pieces.append(fn(x[..., t:t + size], state, weight, bias, "silu", seqlens))
        t += size
        if circular:
            seqlens = seqlens + size
    assert rel_err(torch.cat(pieces, dim=-1), want) <= 1e-10


@pytest.mark.parametrize("impl", UPDATE_FNS)
def test_update_half_and_bad_inputs(impl):
    fn = UPDATE_FNS[impl]
    gen = torch.Generator().manual_seed(1)
    weight, bias = torch.randn(4, 3, generator=gen), torch.randn(4, generator=gen)
    x = torch.randn(2, 4, generator=gen, dtype=torch.bfloat16)
    state = torch.randn(2, 4, 2, generator=gen, dtype=torch.bfloat16)
    want, _ = update_oracle(x[..., None], state, weight, bias, "silu")
    out = fn(x, state, weight, bias, "silu")
    assert out.dtype == torch.bfloat16 and rel_err(out, want[..., 0]) <= 1.6e-2

    state = torch.zeros(2, 4, 3)
    with pytest.raises(ValueError, match=r"x must have shape \(batch, dim\) or \(batch, dim, seqlen\)"):
        fn(torch.zeros(4), state, weight)
    with pytest.raises(ValueError, match=r"conv_state must have shape \(batch, dim, state_len >= width - 1\)"):
        fn(torch.zeros(2, 4), torch.zeros(2, 4, 1), weight)
    with pytest.raises(ValueError, match=r"conv_state must have shape .*got \(3, 4, 3\)"):
        fn(torch.zeros(2, 4), torch.zeros(3, 4, 3), weight)
    with pytest.raises(ValueError, match=r"weight must have shape \(dim, width\) = \(4, width\)"):
        fn(torch.zeros(2, 4), state, weight[:2])
    with pytest.raises(ValueError, match=r"bias must have shape \(dim,\) = \(4,\)"):
        fn(torch.zeros(2, 4), state, weight, torch.zeros(3))
    with pytest.raises(ValueError, match=r"cache_seqlens must have shape \(batch,\) = \(2,\)"):
        fn(torch.zeros(2, 4), state, weight, cache_seqlens=torch.zeros(3, dtype=torch.int32))
    with pytest.raises(TypeError, match="conv_state must be a floating-point tensor"):
        fn(torch.zeros(2, 4), state.long(), weight)
    with pytest.raises(NotImplementedError, match="activation"):
        fn(torch.zeros(2, 4), state, weight, activation="tanh")
