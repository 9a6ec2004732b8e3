"""rms_norm_fn / layer_norm_fn / RMSNorm (pure-PyTorch stand-ins for upstream's Triton kernels)
against the formulas of the reference doc, section 2, in float64 (oracles.rms_norm64, layer_norm64):
    s = x + residual (or x);  rms: s / sqrt(mean(s^2) + eps) * weight (+ bias)
    layer: (s - mean(s)) / sqrt(var(s) + eps) * weight (+ bias)
"""

import inspect
import itertools

import pytest
import torch
import torch.nn as nn

from mamba_ssm.ops.triton import layernorm as layernorm_111
from mamba_ssm.ops.triton.layer_norm import RMSNorm, layer_norm_fn, rms_norm_fn

from oracles import layer_norm64, rel_err, rms_norm64


def make(dtype=torch.float32, seed=0, shape=(3, 5, 16)):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, generator=gen) * 3 + 0.5).to(dtype)
    residual = torch.randn(*shape, generator=gen).to(dtype)
    weight = (torch.rand(shape[-1], generator=gen) + 0.5).to(dtype)
    bias = torch.randn(shape[-1], generator=gen).to(dtype)
    return x, residual, weight, bias


@pytest.mark.parametrize("fn,formula", [(rms_norm_fn, rms_norm64), (layer_norm_fn, layer_norm64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_formula_with_residual_and_prenorm(fn, formula, dtype):
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    for seed, (use_res, use_bias, prenorm, eps) in enumerate(
            itertools.product((False, True), (False, True), (False, True), (1e-6, 1e-2))):
        x, residual, weight, bias = make(dtype, seed)
        res, b = (residual if use_res else None), (bias if use_bias else None)
        result = fn(x, weight, b, residual=res, eps=eps, prenorm=prenorm)
        s = x.double() + residual.double() if use_res else x.double()
        out = result[0] if prenorm else result
        assert out.dtype == dtype and rel_err(out, formula(s, weight, b, eps)) <= tol
        if prenorm:
            assert result[1].dtype == dtype and rel_err(result[1], s) <= tol


@pytest.mark.parametrize("fn,formula", [(rms_norm_fn, rms_norm64), (layer_norm_fn, layer_norm64)])
def test_without_weight(fn, formula):
    """elementwise_affine=False norms have no weight: the formula with weight 1."""
    x, residual, _, bias = make(torch.float64, seed=3)
    out, s = fn(x, None, None, residual=residual, eps=1e-5, prenorm=True)
    assert rel_err(out, formula(x + residual, torch.ones(x.shape[-1], dtype=torch.float64), None, 1e-5)) <= 1e-12
    assert rel_err(s, x + residual) <= 1e-12


def test_layer_norm_fn_is_rms_norm():
    x, residual, weight, bias = make()
    got = layer_norm_fn(x, weight, bias, residual=residual, eps=1e-5, is_rms_norm=True)
    assert rel_err(got, rms_norm64(x + residual, weight, bias, 1e-5)) <= 1e-6


@pytest.mark.parametrize("fn", [rms_norm_fn, layer_norm_fn])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_and_residual_in_fp32(fn, dtype):
    x, residual, weight, bias = make(dtype, seed=4)
    weight32 = weight.float()
    formula = rms_norm64 if fn is rms_norm_fn else layer_norm64
    tol = 2e-3 if dtype == torch.float16 else 1.6e-2
    # first block: no residual yet; the sum is kept in float32
    out, s = fn(x, weight32, None, prenorm=True, residual_in_fp32=True)
    assert out.dtype == dtype and s.dtype == torch.float32 and torch.equal(s, x.float())
    assert rel_err(out, formula(x, weight32, None, 1e-6)) <= tol
    # later blocks: a float32 residual comes in and the float32 sum goes out, unrounded
    res32 = residual.float() * 1.001
    out, s = fn(x, weight32, None, residual=res32, prenorm=True, residual_in_fp32=True)
    assert s.dtype == torch.float32 and torch.equal(s, x.float() + res32)
    assert rel_err(out, formula(x.float() + res32, weight32, None, 1e-6)) <= tol
    # without residual_in_fp32 and no residual, the sum keeps x's dtype
    out, s = fn(x, weight, bias, prenorm=True)
    assert s.dtype == dtype and torch.equal(s, x)


def test_prenorm_residual_keeps_incoming_residual_dtype():
    x, residual, weight, _ = make(torch.float16, seed=5)
    _, s = rms_norm_fn(x, weight.float(), None, residual=residual.float(), prenorm=True, residual_in_fp32=False)
    assert s.dtype == torch.float32


def test_rms_norm_fn_argument_order_is_the_reference_docs():
    # the order the reference doc states (positional callers get eps 5th, prenorm 6th)
    expected = ["x", "weight", "bias", "residual", "eps", "prenorm", "residual_in_fp32"]
    assert list(inspect.signature(rms_norm_fn).parameters) == expected
    assert list(inspect.signature(layer_norm_fn).parameters) == expected + ["is_rms_norm"]
    x, residual, weight, _ = make(seed=6)
    out, s = layernorm_111.rms_norm_fn(x, weight, None, residual, 1e-5, True)
    assert rel_err(out, rms_norm64(x + residual, weight, None, 1e-5)) <= 1e-6 and rel_err(s, x + residual) <= 1e-6


def test_rms_norm_module():
    norm = RMSNorm(16)
    assert norm.eps == 1e-5 and norm.bias is None
    assert list(norm.state_dict()) == ["weight"] and torch.equal(norm.weight, torch.ones(16))
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x, residual, _, _ = make(seed=7)
    assert rel_err(norm(x), rms_norm64(x, norm.weight, None, 1e-5)) <= 1e-6
    # no mean subtraction: unlike LayerNorm, shifting the input changes the output
    layer = nn.LayerNorm(16, elementwise_affine=False)
    assert torch.allclose(layer(x + 3.0), layer(x), atol=1e-4)
    assert not torch.allclose(norm(x + 3.0), norm(x), atol=1e-2)
    out, s = norm(x, residual=residual, prenorm=True, residual_in_fp32=True)
    assert rel_err(out, rms_norm64(x + residual, norm.weight, None, 1e-5)) <= 1e-6 and rel_err(s, x + residual) <= 1e-7
    assert RMSNorm(16, eps=1e-6, dropout_p=0.0, dtype=torch.float64).weight.dtype == torch.float64
    assert layernorm_111.RMSNorm is RMSNorm


def test_gradcheck():
    x, residual, weight, bias = (t.requires_grad_() for t in make(torch.float64, seed=8, shape=(2, 6)))

    def both(fn):
        return lambda *a: fn(a[0], a[1], a[2], residual=a[3], eps=1e-3, prenorm=True)

    assert torch.autograd.gradcheck(both(rms_norm_fn), (x, weight, bias, residual))
    assert torch.autograd.gradcheck(both(layer_norm_fn), (x, weight, bias, residual))


@pytest.mark.parametrize("fn", [rms_norm_fn, layer_norm_fn])
def test_bad_inputs_name_the_argument(fn):
    x, w = torch.randn(2, 3, 8), torch.ones(8)
    with pytest.raises(ValueError, match=r"weight must have shape \(hidden,\) = \(8,\) like x's last dim, got \(3, 8\)"):
        fn(x, torch.ones(3, 8), None)  # would broadcast silently
    with pytest.raises(ValueError, match=r"bias must have shape \(hidden,\) = \(8,\)"):
        fn(x, w, torch.zeros(9))
    with pytest.raises(ValueError, match=r"residual must have shape \(2, 3, 8\) like x, got \(1, 1, 8\)"):
        fn(x, w, None, residual=torch.zeros(1, 1, 8))  # would broadcast silently
    with pytest.raises(TypeError, match="x must be a floating-point tensor, got torch.int64"):
        fn(x.long(), w, None)
