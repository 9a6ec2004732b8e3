"""Conv states of packed variable-length sequences (causal-conv1d 1.4's `causal_conv1d_varlen`).

Glossary: t total tokens of all sequences packed one after another, d channels, b sequences,
s state length.

Sequence i holds tokens cu_seqlens[i] .. cu_seqlens[i+1] - 1 of x. Its conv state is the last s
of its tokens, right-aligned, with zeros in front when the sequence is shorter than s:

    states[i, :, s - k - 1] = x[cu_seqlens[i+1] - 1 - k]   for k < min(s, length of sequence i)

(the state `causal_conv1d_update` continues from after a prefill of the packed batch).
Upstream computes this with Triton; here `causal_conv1d_varlen_states` is one gather and
`causal_conv1d_varlen_states_ref` a loop over sequences. Both return (b, d, s) laid out
channel-last, as upstream's does (a transposed (b, s, d) tensor), in x's dtype.
"""

import torch

from causal_conv1d.arg_checks import shape_error


def _check_varlen_args(x, cu_seqlens, state_len):
    if x.dim() != 2:
        raise shape_error("x", "(total_tokens, dim)", x)
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1:
        raise shape_error("cu_seqlens", "(batch + 1,)", cu_seqlens)
    if cu_seqlens.is_floating_point() or cu_seqlens.is_complex() or cu_seqlens.dtype == torch.bool:
        raise TypeError(f"cu_seqlens must be an integer tensor, got {cu_seqlens.dtype}")
    if isinstance(state_len, bool) or not isinstance(state_len, int) or state_len < 0:
        raise ValueError(f"state_len must be an int >= 0, got {state_len!r}")
    bounds = cu_seqlens.long()
    if bool((bounds[1:] < bounds[:-1]).any()) or int(bounds[0]) < 0 or int(bounds[-1]) > x.shape[0]:
        raise ValueError(f"cu_seqlens must be sorted, start at 0 or more and end at most at "
                         f"total_tokens={x.shape[0]}, got {bounds.tolist()}")


def causal_conv1d_varlen_states(x, cu_seqlens, state_len):
    """Conv states of packed sequences: one gather of the last `state_len` tokens of each.

    x: (total_tokens, dim); cu_seqlens: (batch + 1,) integers, sorted (cumulative sequence
    lengths, usually starting at 0); state_len: int >= 0.
    Returns states (batch, dim, state_len) in x's dtype; slots before a short (or empty)
    sequence's first token are zero. Upstream's is forward-only; this one is differentiable.
    """
    _check_varlen_args(x, cu_seqlens, state_len)
    bounds = cu_seqlens.to(device=x.device, dtype=torch.long)
    starts, ends = bounds[:-1, None], bounds[1:, None]  # (b, 1) each
    src = ends - state_len + torch.arange(state_len, device=x.device)  # (b, s): token feeding each slot
    valid = src >= starts  # slots reaching before the sequence's start stay zero
    if x.shape[0] == 0:  # only empty sequences: nothing to gather
        return x.new_zeros(src.shape[0], state_len, x.shape[1]).transpose(1, 2)
    gathered = x[src.clamp(min=0)]  # (b, s, d); clamped indices are masked out below
    states = torch.where(valid[..., None], gathered, gathered.new_zeros(()))
    return states.transpose(1, 2)  # (b, d, s), channel-last storage


def causal_conv1d_varlen_states_ref(x, cu_seqlens, state_len):
    """Reference: copy each sequence's last tokens into a zeroed state, one sequence at a time.

    Same arguments, shapes and results as `causal_conv1d_varlen_states`.
    """
    _check_varlen_args(x, cu_seqlens, state_len)
    batch, dim = cu_seqlens.shape[0] - 1, x.shape[1]
    states = x.new_zeros(batch, state_len, dim)
    for i in range(batch):
        start, end = int(cu_seqlens[i]), int(cu_seqlens[i + 1])
        k = min(state_len, end - start)  # tokens of sequence i that fit
        if k:
            states[i, state_len - k:] = x[end - k:end]
    return states.transpose(1, 2)
