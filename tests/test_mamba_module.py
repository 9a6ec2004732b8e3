"""The Mamba mixer and Block (mamba_ssm.modules.mamba_simple) against a float64 formula.

The formula is the reference doc's section 3, written step by step on the module's parameters
(oracles.mixer_oracle): for "v2" both directions with their own parameters, x and z
flipped for the backward branch, outputs summed, /2 when if_divide_out, out_proj, gamma. Errors
are max|got - want| / max|want|: at most 1e-10 for float64 modules and 1e-4 for float32 ones.
"""

import copy
import functools
import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mamba_ssm
import mamba_ssm.ops.selective_scan_fast as scan_fast_module
from mamba_ssm import Mamba
from mamba_ssm.modules.mamba_simple import Block, build_inference_constants
from mamba_ssm.ops.triton.layer_norm import RMSNorm
from mamba_ssm.utils.generation import InferenceParams

from kernel_inputs import D_MODEL, D_STATE, hidden_states, make_mixer
from oracles import layer_norm64, mixer_oracle, params64, rel_err, rms_norm64

RTOL = {torch.float64: 1e-10, torch.float32: 1e-4}


def run(m, h, mode):
    """Forward in one of the ways a mixer is used."""
    if mode == "eval":  # inference: the stacked v2 path with its held weights
        with torch.no_grad():
            return m.eval()(h)
    if mode == "train":  # fine-tuning: autograd through the fallback
        out = m.train()(h.clone().requires_grad_())
        out.sum().backward()
        return out.detach()
    if mode == "ref":
        return on_backend(m, "ref", h)
    raise AssertionError(mode)


def on_backend(m, name, h):
    """An eval-mode forward of m told backend `name`; m is told "auto" again afterwards."""
    m.set_backend(name)
    try:
        with torch.no_grad():
            return m.eval()(h)
    finally:
        m.set_backend("auto")


@pytest.mark.parametrize("bimamba_type", ["v2", "v1", "none"])
@pytest.mark.parametrize("if_divide_out", [False, True])
@pytest.mark.parametrize("init_layer_scale", [None, 0.5])
def test_forward_matches_oracle(bimamba_type, if_divide_out, init_layer_scale):
    for dtype in (torch.float64, torch.float32):
        m = make_mixer(bimamba_type, dtype=dtype, if_divide_out=if_divide_out, init_layer_scale=init_layer_scale)
        h = hidden_states(dtype=dtype)
        want = mixer_oracle(params64(m), h, bimamba_type, if_divide_out)
        for mode in ("eval", "train", "ref"):
            out = run(m, h, mode)
            assert out.dtype == dtype and out.shape == h.shape
            assert rel_err(out, want) <= RTOL[dtype], (dtype, mode)


@pytest.mark.parametrize("bimamba_type", ["v2", "v1", "none"])
def test_other_shapes_and_biases(bimamba_type):
    # a single token, a Vim-Tiny token count, and Linear/conv bias switched the other way
    for seed, (b, l, kwargs) in enumerate([(3, 1, {}), (1, 197, {}), (2, 5, dict(bias=True, conv_bias=False))]):
        m = make_mixer(bimamba_type, seed=seed, dtype=torch.float64, if_divide_out=True, **kwargs)
        h = hidden_states(b, l, torch.float64, seed)
        want = mixer_oracle(params64(m), h, bimamba_type, True)
        for mode in ("eval", "train"):
            assert rel_err(run(m, h, mode), want) <= 1e-10, (l, kwargs, mode)


def test_v2_fast_path_chunk_boundaries(monkeypatch):
    m = make_mixer("v2", dtype=torch.float32, if_divide_out=True).eval()
    h = hidden_states(2, 10)
    want = mixer_oracle(params64(m), h, "v2", True)
    step_bytes = 2 * 2 * m.d_inner * D_STATE * 4  # (directions, batch, d_inner, d_state) float32
    for chunk_bytes in (1, 3 * step_bytes, 5 * step_bytes):
        monkeypatch.setattr(scan_fast_module, "CHUNK_BYTES", chunk_bytes)
        with torch.no_grad():
            assert rel_err(m(h), want) <= 1e-4, chunk_bytes


def test_v2_is_not_the_forward_direction_alone():
    """Guards against upstream's slow path: the _b parameters and the /2 must matter, also with
    use_fast_path=False (upstream's switch to that path)."""
    m = make_mixer("v2", dtype=torch.float64, if_divide_out=True, use_fast_path=False)
    h = hidden_states(dtype=torch.float64)
    p = params64(m)
    for mode in ("eval", "train", "ref"):
        out = run(m, h, mode)
        assert rel_err(out, mixer_oracle(p, h, "v2", True)) <= 1e-10
        assert rel_err(out, mixer_oracle(p, h, "none")) > 0.05
        assert rel_err(out, mixer_oracle(p, h, "v2", if_divide_out=False)) > 0.05


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 1e-2), (torch.bfloat16, 5e-2)])
def test_half_precision_module_and_strided_input(dtype, tol):
    m = make_mixer("v2", if_divide_out=True).to(dtype).eval()
    h = hidden_states(2, 9).to(dtype)
    want = mixer_oracle(params64(m), h, "v2", True)  # the same rounded parameters, in float64
    out = eval_forward(m, h)
    assert out.dtype == dtype and rel_err(out, want) <= tol
    strided = h.transpose(0, 1).contiguous().transpose(0, 1)  # (b, l, d) stored l-major
    assert not strided.is_contiguous() and torch.equal(eval_forward(m, strided), out)


# ---- inference weights held in eval mode -------------------------------------------------------

def eval_forward(m, h):
    with torch.no_grad():
        return m.eval()(h)


@pytest.mark.parametrize("name", ["A_b_log", "A_log", "D_b", "conv1d_b.weight", "conv1d.bias", "x_proj_b.weight",
                                  "dt_proj_b.weight", "dt_proj.bias"])
def test_in_place_parameter_change_is_seen(name):
    m = make_mixer("v2", if_divide_out=True)
    h = hidden_states()
    before = eval_forward(m, h)
    assert torch.equal(eval_forward(m, h), before)
    with torch.no_grad():
        m.get_parameter(name).add_(0.1)
    after = eval_forward(m, h)
    assert rel_err(after, mixer_oracle(params64(m), h, "v2", True)) <= 1e-4
    assert not torch.allclose(after, before)


def test_parameter_change_through_data_is_seen():
    m = make_mixer("v2", if_divide_out=True)
    h = hidden_states()
    eval_forward(m, h)
    m.A_b_log.data.add_(0.5)  # no version counter sees this; eval_forward's m.eval() refreshes the cache
    assert rel_err(eval_forward(m, h), mixer_oracle(params64(m), h, "v2", True)) <= 1e-4


def test_load_state_dict_replaced_parameter_and_dtype_change_are_seen():
    m, other = make_mixer("v2", seed=0, if_divide_out=True), make_mixer("v2", seed=1, if_divide_out=True)
    h = hidden_states()
    eval_forward(m, h)
    m.load_state_dict(other.state_dict())
    assert torch.equal(eval_forward(m, h), eval_forward(other, h))
    m.D_b = nn.Parameter(m.D_b.detach() * 3)
    assert rel_err(eval_forward(m, h), mixer_oracle(params64(m), h, "v2", True)) <= 1e-4
    # a training step in between, then eval again
    run(m, h, "train")
    with torch.no_grad():
        m.x_proj_b.weight.mul_(0.5)
    assert rel_err(eval_forward(m, h), mixer_oracle(params64(m), h, "v2", True)) <= 1e-4
    m.double()
    h64 = h.double()
    assert rel_err(eval_forward(m, h64), mixer_oracle(params64(m), h64, "v2", True)) <= 1e-10


def test_deepcopy_and_pickle_after_eval_forward():
    m = make_mixer("v2", if_divide_out=True)
    h = hidden_states()
    want = eval_forward(m, h)
    clone = copy.deepcopy(m)
    with torch.no_grad():
        clone.D_b.add_(1.0)  # must not touch the original's cache
    assert torch.equal(eval_forward(m, h), want)
    assert rel_err(eval_forward(clone, h), mixer_oracle(params64(clone), h, "v2", True)) <= 1e-4


def test_inference_mode_then_no_grad_then_training():
    m = make_mixer("v2", if_divide_out=True).eval()
    h = hidden_states()
    want = mixer_oracle(params64(m), h, "v2", True)
    with torch.inference_mode():
        assert rel_err(m(h), want) <= 1e-4
    assert rel_err(eval_forward(m, h), want) <= 1e-4
    assert rel_err(run(m, h, "train"), want) <= 1e-4


def test_module_made_under_inference_mode_sees_loads_and_rebuilds():
    h = hidden_states()
    with torch.inference_mode():  # inference-tensor parameters
        m = make_mixer("v2", if_divide_out=True).eval()
        m(h)
        m.load_state_dict({k: v + 0.1 for k, v in m.state_dict().items()})  # no eval() needed after a load
        assert rel_err(m(h), mixer_oracle(params64(m), h, "v2", True)) <= 1e-4
        m.A_log.add_(1.0)
        build_inference_constants(m)  # the documented way after an in-place change in eval mode
        assert rel_err(m(h), mixer_oracle(params64(m), h, "v2", True)) <= 1e-4



@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_v2_with_one_direction_int8_runs_its_dequantized_weights(backend):
    """Only x_proj int8 (x_proj_b float): the stacked kernels read both as dense weights, the
    int8 one dequantized, so the mixer computes what a float x_proj holding those weights does."""
    from mamba_ssm.modules.mamba_simple import dense_linear

    m = torch.ao.quantization.quantize_dynamic(make_mixer("v2", if_divide_out=True).eval(), {"x_proj"}, torch.qint8)
    h = hidden_states()
    got = eval_forward(m.set_backend(backend), h)
    weight, _ = dense_linear(m.x_proj)
    m.x_proj = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        m.x_proj.weight.copy_(weight)
    assert rel_err(got, eval_forward(m.set_backend(backend), h)) <= 1e-5

def test_inference_weights_are_built_once_not_per_forward(monkeypatch):
    """The first inference forward after eval() builds the weights; later ones reuse them (no cache
    keyed on tensor versions): an in-place change after that build is used once
    build_inference_constants (or eval()) runs."""
    import mamba_ssm.modules.mamba_simple as mamba_simple

    built = []
    real = mamba_simple.stack_directions
    monkeypatch.setattr(mamba_simple, "stack_directions", lambda *a: built.append(1) or real(*a))
    m = make_mixer("v2", if_divide_out=True).eval()
    h = hidden_states()
    with torch.no_grad():
        m.A_b_log.add_(0.3)  # before the first forward: seen
        before = m(h)
        assert len(built) == 1 and rel_err(before, mixer_oracle(params64(m), h, "v2", True)) <= 1e-4
        m.D_b.add_(0.5)
        assert torch.equal(m(h), before) and len(built) == 1  # the held weights, as documented
    build_inference_constants(m)
    with torch.no_grad():
        got = m(h)
    assert len(built) == 2 and rel_err(got, mixer_oracle(params64(m), h, "v2", True)) <= 1e-4


def test_optimizer_step_in_eval_mode_is_seen():
    """An autograd forward drops the held inference weights: a step taken after it is seen."""
    m = make_mixer("v2", if_divide_out=True).eval()
    h = hidden_states()
    eval_forward(m, h)
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    m(h).square().sum().backward()  # eval mode, autograd on
    opt.step()
    with torch.no_grad():
        assert rel_err(m(h), mixer_oracle(params64(m), h, "v2", True)) <= 1e-4


def test_moved_cast_and_pickled_modules_resolve_and_rebuild():
    m = make_mixer("v2", if_divide_out=True).eval()
    h = hidden_states()
    eval_forward(m, h)
    m.double()  # _apply: kernels for float64 and weights rebuilt, without eval()
    with torch.no_grad():
        got = m(h.double())
    assert got.dtype == torch.float64 and rel_err(got, mixer_oracle(params64(m), h, "v2", True)) <= 1e-10
    assert mamba_ssm.kernel_report(m)["mixer"] == "torch"  # the fused numba mixer is float32 only
    clone = pickle.loads(pickle.dumps(m.float().set_backend("ref")))
    assert mamba_ssm.kernel_report(clone)["mixer"] == "ref"  # the backend survives, the kernels are resolved again
    with torch.no_grad():
        assert rel_err(clone(h), mixer_oracle(params64(m), h, "v2", True)) <= 1e-4


@pytest.mark.parametrize("bimamba_type", ["v2", "none"])
def test_empty_sequence(bimamba_type):
    m = make_mixer(bimamba_type).eval()
    h = hidden_states(3, 0)
    for mode in ("eval", "ref"):
        assert run(m, h, mode).shape == (3, 0, D_MODEL)


def test_float64_module_keeps_float32_A_and_computes_in_float64():
    torch.manual_seed(0)
    m = Mamba(D_MODEL, d_state=D_STATE, bimamba_type="v2", if_divide_out=True, dtype=torch.float64)
    assert m.A_log.dtype == torch.float32 and m.in_proj.weight.dtype == torch.float64  # as upstream
    h = hidden_states(dtype=torch.float64)
    want = mixer_oracle(params64(m), h, "v2", True)
    for mode in ("eval", "ref"):
        got = run(m, h, mode)
        assert got.dtype == torch.float64 and rel_err(got, want) <= 1e-10


# ---- dynamic int8 ---------------------------------------------------------------------------

def quantized(m):
    return torch.ao.quantization.quantize_dynamic(copy.deepcopy(m), {nn.Linear}, dtype=torch.qint8)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore:torch.quantize_per_tensor:UserWarning")
@pytest.mark.parametrize("bimamba_type", ["v2", "v1", "none"])
def test_dynamic_int8_mixer(bimamba_type):
    m = make_mixer(bimamba_type, if_divide_out=True).eval()
    h = hidden_states(2, 12)
    want = eval_forward(m, h)
    q = quantized(m).eval()
    assert not isinstance(q.x_proj.weight, torch.Tensor)  # really replaced
    got = eval_forward(q, h)
    assert got.shape == want.shape and torch.isfinite(got).all()
    assert 0 < rel_err(got, want) <= 0.1
    # the ref backend: dequantized projection weights, float activations
    assert rel_err(on_backend(q, "ref", h), want) <= 0.1


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore:torch.quantize_per_tensor:UserWarning")
def test_in_place_quantization_after_eval_forward():
    m = make_mixer("v2", if_divide_out=True).eval()
    h = hidden_states()
    fresh = eval_forward(quantized(m), h)
    eval_forward(m, h)  # fills the cache with float projections
    torch.ao.quantization.quantize_dynamic(m, {nn.Linear}, dtype=torch.qint8, inplace=True)
    assert torch.equal(eval_forward(m, h), fresh)


# ---- decoding -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_step_decoding_equals_forward_for_causal_mixer(dtype):
    m = make_mixer("none", dtype=dtype, init_layer_scale=0.7).eval()
    h = hidden_states(2, 9, dtype)
    want = eval_forward(m, h)
    conv_state, ssm_state = m.allocate_inference_cache(2, 9)
    assert conv_state.shape == (2, m.d_inner, m.d_conv) and ssm_state.shape == (2, m.d_inner, D_STATE)
    assert not conv_state.any() and not ssm_state.any()
    with torch.no_grad():
        steps = [m.step(h[:, t:t + 1], conv_state, ssm_state)[0] for t in range(9)]
    assert rel_err(torch.cat(steps, dim=1), want) <= RTOL[dtype]

    # the same through inference_params: prefill 4 tokens, then decode one at a time
    params = InferenceParams(max_seqlen=9, max_batch_size=2)
    with torch.no_grad():
        outs = [m(h[:, :4], inference_params=params)]
        for t in range(4, 9):
            params.seqlen_offset = t
            outs.append(m(h[:, t:t + 1], inference_params=params))
    assert rel_err(torch.cat(outs, dim=1), want) <= RTOL[dtype]


def test_step_of_bidirectional_mixer_uses_forward_direction():
    m = make_mixer("v2", dtype=torch.float64, if_divide_out=True).eval()
    h = hidden_states(2, 6, torch.float64)
    want = mixer_oracle(params64(m), h, "none")  # forward-direction parameters only
    conv_state, ssm_state = m.allocate_inference_cache(2, 6)
    with torch.no_grad():
        steps = [m.step(h[:, t:t + 1], conv_state, ssm_state)[0] for t in range(6)]
    assert rel_err(torch.cat(steps, dim=1), want) <= 1e-10
    for bimamba_type in ("v1", "v2"):
        with pytest.raises(NotImplementedError, match="inference_params"):
            make_mixer(bimamba_type)(hidden_states(), inference_params=InferenceParams(7, 2))
    with pytest.raises(ValueError, match="one token at a time"):
        m.step(h[:, :2], conv_state, ssm_state)


def test_bad_constructor_and_input():
    with pytest.raises(ValueError, match="bimamba_type"):
        Mamba(D_MODEL, bimamba_type="v3")
    with pytest.raises(ValueError, match=r"hidden_states must have shape \(batch, seqlen, 8\)"):
        make_mixer("v2")(torch.zeros(2, 7, 9))


def test_parameter_names_shapes_and_init():
    m = Mamba(16, d_state=D_STATE, bimamba_type="v2", if_divide_out=True, init_layer_scale=1e-3)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    d_inner, r = 32, 1
    direction = {"conv1d{}.weight": (d_inner, 1, 4), "conv1d{}.bias": (d_inner,),
                 "x_proj{}.weight": (r + 2 * D_STATE, d_inner), "dt_proj{}.weight": (d_inner, r),
                 "dt_proj{}.bias": (d_inner,), "A{}_log": (d_inner, D_STATE), "D{}": (d_inner,)}
    want = {k.format(s): v for k, v in direction.items() for s in ("", "_b")}
    want.update({"in_proj.weight": (2 * d_inner, 16), "out_proj.weight": (16, d_inner), "gamma": (16,)})
    assert shapes == want
    torch.testing.assert_close(-torch.exp(m.A_b_log), -torch.arange(1.0, D_STATE + 1).expand(d_inner, -1))
    assert torch.equal(m.D_b, torch.ones(d_inner))
    dt = F.softplus(m.dt_proj_b.bias)
    assert (dt >= 1e-3 * (1 - 1e-5)).all() and (dt <= 0.1 * (1 + 1e-5)).all()
    assert set(Mamba(16, bimamba_type="v1").state_dict()) == {
        "in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight", "dt_proj.bias",
        "A_log", "A_b_log", "D", "out_proj.weight"}


# ---- gradients ------------------------------------------------------------------------------

def test_v2_gradcheck_training_mode():
    torch.manual_seed(0)
    m = Mamba(4, d_state=2, d_conv=3, expand=1, bimamba_type="v2", if_divide_out=True).double().train()
    names = ("A_b_log", "D_b", "conv1d_b.weight", "dt_proj_b.bias", "x_proj_b.weight", "A_log")
    params = {k: m.get_parameter(k).detach().clone().requires_grad_() for k in names}
    h = torch.randn(1, 3, 4, dtype=torch.float64, requires_grad=True)

    def f(h, *values):
        return torch.func.functional_call(m, dict(zip(names, values)), (h,))

    assert torch.autograd.gradcheck(f, (h, *params.values()))


@pytest.mark.parametrize("bimamba_type", ["v2", "v1", "none"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_parameter_gradients_match_oracle(bimamba_type, dtype, tol):
    m = make_mixer(bimamba_type, dtype=dtype, if_divide_out=True, init_layer_scale=0.3).train()
    h = hidden_states(2, 11, dtype)
    cotangent = torch.randn(2, 11, D_MODEL, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    leaves = {k: v.clone().requires_grad_() for k, v in params64(m).items()}
    h64 = h.to(torch.float64, copy=True).requires_grad_()
    want = torch.autograd.grad((mixer_oracle(leaves, h64, bimamba_type, True) * cotangent).sum(),
                               [h64, *leaves.values()])
    h_leaf = h.clone().requires_grad_()
    (m(h_leaf).double() * cotangent).sum().backward()
    got = [h_leaf.grad] + [m.get_parameter(k).grad for k in leaves]
    for name, g, w in zip(["hidden", *leaves], got, want):
        assert g is not None and rel_err(g, w) <= tol, name


# ---- Block ----------------------------------------------------------------------------------

@pytest.mark.parametrize("fused_add_norm", [True, False])
@pytest.mark.parametrize("residual_in_fp32", [True, False])
@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_block(fused_add_norm, residual_in_fp32, norm):
    torch.manual_seed(3)
    norm_cls = functools.partial(RMSNorm, eps=1e-5) if norm == "rms" else functools.partial(nn.LayerNorm, eps=1e-5)
    block = Block(D_MODEL, functools.partial(Mamba, d_state=D_STATE, bimamba_type="v2", if_divide_out=True),
                  norm_cls=norm_cls, fused_add_norm=fused_add_norm, residual_in_fp32=residual_in_fp32).eval()
    with torch.no_grad():
        for p in block.norm.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    h1, h2 = hidden_states(seed=1), hidden_states(seed=2)

    def normed(s):
        if norm == "rms":
            return rms_norm64(s, block.norm.weight, None, 1e-5)
        return layer_norm64(s, block.norm.weight, block.norm.bias, 1e-5)

    with torch.no_grad():
        out, residual = block(h1)
        assert torch.equal(residual, h1) and residual.dtype == torch.float32
        assert rel_err(out, block.mixer(normed(h1).float())) <= 1e-4
        out, residual = block(h2, residual)
        assert rel_err(residual, h1.double() + h2.double()) <= 1e-7
        assert rel_err(out, block.mixer(normed(h1.double() + h2.double()).float())) <= 1e-4
    conv_state, ssm_state = block.allocate_inference_cache(2, 7)
    assert conv_state.shape == (2, 2 * D_MODEL, 4) and ssm_state.shape == (2, 2 * D_MODEL, D_STATE)


def test_block_residual_in_fp32_with_half_inputs():
    block = Block(D_MODEL, functools.partial(Mamba, d_state=D_STATE, bimamba_type="v2"),
                  norm_cls=RMSNorm, fused_add_norm=True, residual_in_fp32=True).to(torch.bfloat16).eval()
    h = hidden_states().to(torch.bfloat16)
    with torch.no_grad():
        out, residual = block(h)
        assert out.dtype == torch.bfloat16 and residual.dtype == torch.float32
        out, residual = block(out, residual)
        assert residual.dtype == torch.float32 and torch.isfinite(out.float()).all()


@pytest.mark.parametrize("fused_add_norm", [False, True])
def test_block_with_a_layer_norm_without_affine_parameters(fused_add_norm):
    block = Block(D_MODEL, functools.partial(Mamba, d_state=D_STATE, bimamba_type="v2"), fused_add_norm=fused_add_norm,
                  norm_cls=functools.partial(nn.LayerNorm, eps=1e-5, elementwise_affine=False)).eval()
    h1, h2 = hidden_states(seed=1), hidden_states(seed=2)
    with torch.no_grad():
        out, residual = block(h2, h1)
        want = block.mixer(F.layer_norm((h1.double() + h2.double()), (D_MODEL,), eps=1e-5).float())
    assert rel_err(residual, h1.double() + h2.double()) <= 1e-7 and rel_err(out, want) <= 1e-4


# ---- kernels held per module ------------------------------------------------------------------

def test_use_fast_path_false_runs_the_v2_mixer_composed(monkeypatch):
    """use_fast_path=False: upstream's unfused path (two one-direction inner paths), with the
    backward direction kept; True: the stacked kernel. Same result either way."""
    import mamba_ssm.ops.bimamba_v2 as v2

    calls = []
    real = v2.inner_no_out_proj
    monkeypatch.setattr(v2, "inner_no_out_proj", lambda *a, **k: calls.append(a[:2]) or real(*a, **k))
    h = hidden_states(dtype=torch.float64)
    for fast, expected in ((False, [("torch", "torch")] * 2), (True, [])):
        m = make_mixer("v2", dtype=torch.float64, if_divide_out=True, use_fast_path=fast).eval()
        m.set_backend("torch")
        calls.clear()
        with torch.no_grad():
            got = m(h)
        assert calls == expected and rel_err(got, mixer_oracle(params64(m), h, "v2", True)) <= 1e-10


def test_use_backend_does_not_reach_a_model_silently():
    m = make_mixer("v2").eval()
    h = hidden_states()
    with mamba_ssm.use_backend("ref"), pytest.raises(RuntimeError, match=r"call model.set_backend\('ref'\)"):
        m(h)
    m.set_backend("ref")
    with mamba_ssm.use_backend("ref"), torch.no_grad():  # the same choice: runs
        assert rel_err(m(h), mixer_oracle(params64(m), h, "v2")) <= 1e-4
    with mamba_ssm.use_backend("auto"), torch.no_grad():  # no choice: the model's
        m(h)


def test_set_backend_that_cannot_run_changes_nothing():
    block = nn.Sequential(make_mixer("v2"), make_mixer("none", seed=1)).eval()
    with pytest.raises(RuntimeError, match="CUDA"):
        mamba_ssm.set_backend(block, "cuda")
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        mamba_ssm.set_backend(block, "gpu")
    assert mamba_ssm.kernel_report(block)["backend"] == "auto"
    mamba_ssm.set_backend(block, "ref")
    assert mamba_ssm.kernel_report(block)["backend"] == "ref" and all(m._backend == "ref" for m in block)
