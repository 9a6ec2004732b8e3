"""The Mamba mixer (with Vim's bidirectional variants) and the residual Block around it.

Glossary: b batch, l sequence length, d_model model width, d_inner = expand * d_model, n
d_state, r dt_rank, w d_conv.

Constructor arguments, parameter names (checkpoint keys) and results are upstream's
(state-spaces/mamba 1.1.1 as extended by hustvl/Vim). Differences on purpose:
  - every path computes what upstream's fused CUDA path computes. Upstream's non-fused path
    (use_fast_path=False) runs only the forward direction of a "v2" mixer, ignoring all _b
    parameters and the /2, so `use_fast_path` is accepted but changes nothing here;
  - a "v2" mixer runs through `mamba_ssm.ops.bimamba_v2.bimamba_v2_fn`, which picks the backend
    (both directions stacked on "torch" and "numba");
    in eval mode without autograd it also caches its derived constants (A = -exp(A_log), stacked
    weights) until a parameter changes (in place, replaced, reloaded) or train()/eval() is
    called; writes through `param.data` or a `.numpy()` view are invisible to PyTorch's version
    counters, so call eval() again after them. Parameters that
    are inference tensors (made under inference_mode) have no version counter: no caching;
  - Linear layers may be replaced by dynamically quantized ones (they have no `.weight`
    tensor): modules are called, or their weights dequantized, as needed.
"""

import math
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

from causal_conv1d import causal_conv1d_fn, causal_conv1d_update
from mamba_ssm.ops.bimamba_v2 import bimamba_v2_fn
from mamba_ssm.ops.selective_scan_interface import (
    bimamba_inner_fn_no_out_proj,
    inner_projections,
    mamba_inner_fn_no_out_proj,
    selective_scan_fn,
)
from mamba_ssm.ops.triton.layer_norm import RMSNorm, layer_norm_fn, rms_norm_fn
from mamba_ssm.ops.triton.selective_state_update import selective_state_update

BIMAMBA_TYPES = ("none", "v1", "v2")


def dense_linear(linear):
    """(weight, bias) of a Linear as float tensors, also for a dynamically quantized Linear."""
    weight = linear.weight
    if isinstance(weight, torch.Tensor):
        return weight, linear.bias
    return weight().dequantize(), linear.bias()


def _fp32(t):
    """Upstream computes A, D and delta_bias in float32 (`.float()`); float64 stays float64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _stacked_linear(weight, bias):
    """Apply two Linear layers stacked on dim 0: weight (2, out, in), bias (2, out) or None;
    maps x (2, ..., in) -> (2, ..., out) with one batched matmul."""
    weight_t = weight.transpose(1, 2)
    bias = None if bias is None else bias.unsqueeze(1)  # (2, 1, out)

    def apply(x):
        flat = x.reshape(2, -1, x.shape[-1])
        y = torch.bmm(flat, weight_t) if bias is None else torch.baddbmm(bias, flat, weight_t)
        return y.view(*x.shape[:-1], weight.shape[1])

    return apply


def _paired_modules(forward_module, backward_module):
    return lambda x: torch.stack((forward_module(x[0]), backward_module(x[1])))


class Mamba(nn.Module):
    """Selective state-space mixer: (b, l, d_model) -> (b, l, d_model).

    bimamba_type: "none" (causal, one direction), "v1" (second scan with A_b over the flipped
    sequence, shared conv/projections) or "v2" (Vim: a full second set of parameters for the
    flipped sequence). if_divide_out halves the v2 sum; init_layer_scale adds a `gamma` scale.
    """

    def __init__(self, d_model, d_state=16, d_conv=4, expand=2, dt_rank="auto", dt_min=0.001, dt_max=0.1,
                 dt_init="random", dt_scale=1.0, dt_init_floor=1e-4, conv_bias=True, bias=False,
                 use_fast_path=True, layer_idx=None, device=None, dtype=None, bimamba_type="none",
                 if_divide_out=False, init_layer_scale=None):
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        if bimamba_type not in BIMAMBA_TYPES:
            raise ValueError(f"bimamba_type must be one of {BIMAMBA_TYPES}, got {bimamba_type!r}")
        if dt_init not in ("constant", "random"):
            raise NotImplementedError(f"dt_init must be 'constant' or 'random', got {dt_init!r}")
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        self.use_fast_path = use_fast_path
        self.layer_idx = layer_idx
        self.bimamba_type = bimamba_type
        self.if_divide_out = if_divide_out
        self.init_layer_scale = init_layer_scale
        self.activation = "silu"
        self._constants = None  # (key, namespace) cached for eval-mode inference
        if init_layer_scale is not None:
            self.gamma = nn.Parameter(torch.full((d_model,), init_layer_scale, **factory_kwargs))

        self.in_proj = nn.Linear(d_model, self.d_inner * 2, bias=bias, **factory_kwargs)
        self.conv1d, self.x_proj, self.dt_proj = self._direction_layers(conv_bias, dt_init, dt_scale, dt_min,
                                                                        dt_max, dt_init_floor, factory_kwargs)
        self.A_log = self._a_log(device)
        self.D = self._ones_d(device)
        if bimamba_type in ("v1", "v2"):
            self.A_b_log = self._a_log(device)
        if bimamba_type == "v2":
            self.conv1d_b, self.x_proj_b, self.dt_proj_b = self._direction_layers(
                conv_bias, dt_init, dt_scale, dt_min, dt_max, dt_init_floor, factory_kwargs)
            self.D_b = self._ones_d(device)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory_kwargs)

    def _direction_layers(self, conv_bias, dt_init, dt_scale, dt_min, dt_max, dt_init_floor, factory_kwargs):
        conv1d = nn.Conv1d(self.d_inner, self.d_inner, kernel_size=self.d_conv, groups=self.d_inner,
                           padding=self.d_conv - 1, bias=conv_bias, **factory_kwargs)
        x_proj = nn.Linear(self.d_inner, self.dt_rank + self.d_state * 2, bias=False, **factory_kwargs)
        dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **factory_kwargs)
        # dt_proj keeps the variance of its input; its bias is softplus^-1 of a log-uniform dt
        std = self.dt_rank ** -0.5 * dt_scale
        if dt_init == "constant":
            nn.init.constant_(dt_proj.weight, std)
        else:
            nn.init.uniform_(dt_proj.weight, -std, std)
        # init values are computed on the CPU and copied in: on the meta device (how checkpoints
        # are loaded) elementwise ops would import torch._dynamo, ~75 MB and a second at start-up
        dt = torch.exp(torch.rand(self.d_inner, device="cpu") * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min)).clamp(min=dt_init_floor)
        with torch.no_grad():
            dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        dt_proj.bias._no_reinit = True  # Vim's _init_weights zeroes other Linear biases
        return conv1d, x_proj, dt_proj

    def _a_log(self, device):
        # S4D-real init, A = -(1..n) per channel; kept in float32
        A = torch.arange(1, self.d_state + 1, dtype=torch.float32, device="cpu").repeat(self.d_inner, 1)
        param = nn.Parameter(torch.empty(self.d_inner, self.d_state, device=device))
        with torch.no_grad():
            param.copy_(torch.log(A))
        param._no_weight_decay = True
        return param

    def _ones_d(self, device):
        param = nn.Parameter(torch.ones(self.d_inner, device=device))  # float32 skip weight
        param._no_weight_decay = True
        return param

    def forward(self, hidden_states, inference_params=None):
        """hidden_states: (b, l, d_model) -> (b, l, d_model)."""
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.d_model:
            raise ValueError(f"hidden_states must have shape (batch, seqlen, {self.d_model}), "
                             f"got {tuple(hidden_states.shape)}")
        if inference_params is not None:
            return self._forward_with_cache(hidden_states, inference_params)
        xz = self.in_proj(hidden_states)  # (b, l, 2 * d_inner)
        if self.bimamba_type == "v2":
            needs_grad = torch.is_grad_enabled() and (xz.requires_grad or any(p.requires_grad for p in self.parameters()))
            y = bimamba_v2_fn(xz, self._v2_constants, self._v2_directions, self.dt_rank, self.if_divide_out,
                              needs_grad)  # (b, l, d_inner)
        else:
            y = self._inner(xz.transpose(1, 2)).transpose(1, 2)
        return self._scale(self.out_proj(y))

    def _scale(self, out):
        return out * self.gamma if self.init_layer_scale is not None else out

    def _direction_args(self, suffix=""):
        conv = getattr(self, "conv1d" + suffix)
        x_proj_weight, _ = dense_linear(getattr(self, "x_proj" + suffix))
        dt_weight, dt_bias = dense_linear(getattr(self, "dt_proj" + suffix))
        A = -torch.exp(_fp32(getattr(self, "A" + suffix + "_log")))
        return (conv.weight, conv.bias, x_proj_weight, dt_weight, A), dict(
            D=_fp32(getattr(self, "D" + suffix)), delta_bias=_fp32(dt_bias), delta_softplus=True)

    def _inner(self, xz):
        """Upstream's fused functions, dispatching per call: xz (b, 2*d_inner, l) -> (b, d_inner, l)."""
        args, kwargs = self._direction_args()
        if self.bimamba_type == "none":
            return mamba_inner_fn_no_out_proj(xz, *args, **kwargs)
        A_b = -torch.exp(_fp32(self.A_b_log))
        return bimamba_inner_fn_no_out_proj(xz, *args, A_b, **kwargs)

    def _v2_directions(self):
        return self._direction_args(), self._direction_args("_b")

    def _constants_key(self):
        modules = (self.conv1d, self.conv1d_b, self.x_proj, self.x_proj_b, self.dt_proj, self.dt_proj_b)
        params = [p for m in modules for p in m.parameters()] + [self.A_log, self.A_b_log, self.D, self.D_b]
        # module ids catch Linear layers swapped in place (e.g. by quantize_dynamic(inplace=True)).
        # None: a parameter is an inference tensor (created under inference_mode), which has no
        # version counter, so in-place changes to it could not be seen: no caching then.
        if any(p.is_inference() for p in params):
            return None
        return tuple(id(m) for m in modules) + tuple((p.data_ptr(), p._version, p.dtype) for p in params)

    def train(self, mode=True):
        # Writes through `.data` (or a .numpy() view) bypass the version counters the cache key reads; switching
        # mode (model.eval()) is the documented way to refresh after them.
        self._constants = None
        return super().train(mode)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_constants"] = None  # closures over cached tensors: rebuilt on the next forward
        return state

    def _v2_constants(self):
        """Stacked (forward, backward) constants for `bimamba_v2_fast`; cached while the module is
        in eval mode, autograd is off and no parameter has changed (data pointer and version)."""
        key = None if self.training or torch.is_grad_enabled() else self._constants_key()
        if key is None:
            self._constants = None
            return self._build_v2_constants()
        if self._constants is None or self._constants[0] != key:
            self._constants = (key, self._build_v2_constants())
        return self._constants[1]

    def _build_v2_constants(self):
        def stack(a, b):
            return torch.stack((a, b))

        convs = (self.conv1d, self.conv1d_b)
        conv_bias = None if self.conv1d.bias is None else stack(self.conv1d.bias, self.conv1d_b.bias).unsqueeze(1)

        def projection(forward_module, backward_module):
            if isinstance(forward_module.weight, torch.Tensor) and isinstance(backward_module.weight, torch.Tensor):
                bias = None if forward_module.bias is None else stack(forward_module.bias, backward_module.bias)
                return _stacked_linear(stack(forward_module.weight, backward_module.weight), bias)
            return _paired_modules(forward_module, backward_module)

        conv_weight = stack(*(c.weight.squeeze(1).t() for c in convs))  # (2, w, d_inner)
        A = -torch.exp(_fp32(stack(self.A_log, self.A_b_log))).transpose(1, 2).contiguous()  # (2, n, d_inner)
        D = _fp32(stack(self.D, self.D_b))  # (2, d_inner)
        dt_weights, dt_biases = zip(*(dense_linear(m) for m in (self.dt_proj, self.dt_proj_b)))
        return SimpleNamespace(
            # (2, 1, d_inner, w), stored (w, d_inner)-contiguous: each conv tap runs along channels
            conv_weight=conv_weight.unsqueeze(1).transpose(-1, -2),
            conv_bias=conv_bias,  # (2, 1, d_inner)
            x_proj=projection(self.x_proj, self.x_proj_b),
            # dt_proj dense on every path (a quantized one dequantized), as the fused kernel and the
            # composition compute it, so the backends agree on a quantized model too
            dt_proj=_stacked_linear(stack(*dt_weights), stack(*dt_biases)),
            # (2, 1, d_inner, n), stored (n, d_inner)-contiguous: the scan works on A transposed
            A=A.unsqueeze(1).transpose(-1, -2),
            D=D.unsqueeze(1),  # (2, 1, d_inner)
            # the layouts `bimamba_v2_numba` takes: conv taps, dt_proj's rank rows and A's state rows
            # contiguous along channels
            fused=SimpleNamespace(conv_weight=conv_weight,
                                  conv_bias=None if conv_bias is None else conv_bias.squeeze(1),  # (2, d_inner)
                                  dt_weight=stack(*dt_weights).transpose(1, 2).contiguous(),  # (2, r, d_inner)
                                  dt_bias=stack(*dt_biases), A=A, D=D),
        )

    def _forward_with_cache(self, hidden_states, inference_params):
        """Prefill (seqlen_offset == 0) or one decoding step, keeping conv/SSM states in
        inference_params.key_value_memory_dict[layer_idx]. Causal ("none") mixers only."""
        if self.bimamba_type != "none":
            raise NotImplementedError(
                "incremental decoding (inference_params) needs a causal mixer: a bidirectional "
                f"('{self.bimamba_type}') mixer reads the whole sequence, so call forward without "
                "inference_params (step() decodes with the forward direction's parameters only)")
        conv_state, ssm_state = self._get_states_from_cache(inference_params, hidden_states.shape[0])
        if inference_params.seqlen_offset > 0:
            out, _, _ = self.step(hidden_states, conv_state, ssm_state)
            return out
        x, z = self.in_proj(hidden_states).transpose(1, 2).chunk(2, dim=1)  # (b, d_inner, l) each
        conv_state.copy_(F.pad(x, (self.d_conv - x.shape[-1], 0)))  # the last d_conv inputs
        x = causal_conv1d_fn(x, self.conv1d.weight.squeeze(1), self.conv1d.bias, activation=self.activation)
        args, kwargs = self._direction_args()
        delta, B, C = inner_projections(x, args[2], args[3])
        y, last_state = selective_scan_fn(x, delta, args[4], B, C, z=z, return_last_state=True, **kwargs)
        ssm_state.copy_(last_state)
        return self._scale(self.out_proj(y.transpose(1, 2)))

    def step(self, hidden_states, conv_state, ssm_state):
        """One token: hidden_states (b, 1, d_model); conv_state (b, d_inner, d_conv) and ssm_state
        (b, d_inner, d_state) are updated in place. Uses the forward direction's parameters.
        Returns (out (b, 1, d_model), conv_state, ssm_state)."""
        if hidden_states.dim() != 3 or hidden_states.shape[1] != 1:
            raise ValueError(f"step() decodes one token at a time: hidden_states must have shape "
                             f"(batch, 1, {self.d_model}), got {tuple(hidden_states.shape)}")
        x, z = self.in_proj(hidden_states.squeeze(1)).chunk(2, dim=-1)  # (b, d_inner) each
        x = causal_conv1d_update(x, conv_state, self.conv1d.weight.squeeze(1), self.conv1d.bias, self.activation)
        dt, B, C = torch.split(self.x_proj(x), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = self.dt_proj(dt)  # bias included, so no dt_bias below
        A = -torch.exp(_fp32(self.A_log))
        y = selective_state_update(ssm_state, x, dt, A, B, C, self.D, z=z, dt_softplus=True)
        return self._scale(self.out_proj(y)).unsqueeze(1), conv_state, ssm_state

    def allocate_inference_cache(self, batch_size, max_seqlen, dtype=None, **kwargs):
        """Zeroed (conv_state (b, d_inner, d_conv), ssm_state (b, d_inner, d_state))."""
        device = self.A_log.device
        conv_dtype = self.conv1d.weight.dtype if dtype is None else dtype
        ssm_dtype = self.A_log.dtype if dtype is None else dtype
        conv_state = torch.zeros(batch_size, self.d_inner, self.d_conv, device=device, dtype=conv_dtype)
        ssm_state = torch.zeros(batch_size, self.d_inner, self.d_state, device=device, dtype=ssm_dtype)
        return conv_state, ssm_state

    def _get_states_from_cache(self, inference_params, batch_size):
        if self.layer_idx is None:
            raise ValueError("decoding with inference_params needs the mixer's layer_idx")
        cache = inference_params.key_value_memory_dict
        if self.layer_idx not in cache:
            cache[self.layer_idx] = self.allocate_inference_cache(batch_size, inference_params.max_seqlen)
        return cache[self.layer_idx]


def build_inference_constants(model):
    """Build and cache now, instead of in the first forward, the eval-mode constants of every v2
    mixer in `model` (in eval mode): for a CLI to call at model load, so that the first image
    costs what the next ones do (Vim-Tiny: ~6 ms, 24 x ~20 small ops)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, Mamba) and module.bimamba_type == "v2" and not module.training:
                module._v2_constants()


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a sample's branch with probability p (rescaled)."""

    def __init__(self, p=0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class Block(nn.Module):
    """Add -> Norm -> Mixer, returning (mixer output, residual).

    Upstream's order (the add of the previous block's output is fused into this block's norm):
        residual = hidden (first block) or residual + drop_path(hidden)
        hidden   = mixer(norm(residual))
    The residual is kept in float32 when residual_in_fp32.
    """

    def __init__(self, dim, mixer_cls, norm_cls=nn.LayerNorm, fused_add_norm=False, residual_in_fp32=False,
                 drop_path=0.0):
        super().__init__()
        self.residual_in_fp32 = residual_in_fp32
        self.fused_add_norm = fused_add_norm
        self.mixer = mixer_cls(dim)
        self.norm = norm_cls(dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        if fused_add_norm and not isinstance(self.norm, (nn.LayerNorm, RMSNorm)):
            raise ValueError("fused_add_norm needs norm_cls to build an nn.LayerNorm or RMSNorm, "
                             f"got {type(self.norm).__name__}")

    def forward(self, hidden_states, residual=None, inference_params=None):
        """hidden_states, residual: (b, l, dim) -> (hidden_states, residual)."""
        if not self.fused_add_norm:
            residual = hidden_states if residual is None else residual + self.drop_path(hidden_states)
            weight = self.norm.weight  # None for a norm without elementwise affine parameters
            hidden_states = self.norm(residual if weight is None else residual.to(dtype=weight.dtype))
            if self.residual_in_fp32:
                residual = _fp32(residual)
        else:  # rms_norm_fn runs the numba kernel on the numba backend
            norm_fn = rms_norm_fn if isinstance(self.norm, RMSNorm) else layer_norm_fn
            hidden_states, residual = norm_fn(
                hidden_states if residual is None else self.drop_path(hidden_states),
                self.norm.weight, self.norm.bias, residual=residual, eps=self.norm.eps, prenorm=True,
                residual_in_fp32=self.residual_in_fp32)
        return self.mixer(hidden_states, inference_params=inference_params), residual

    def allocate_inference_cache(self, batch_size, max_seqlen, dtype=None, **kwargs):
        return self.mixer.allocate_inference_cache(batch_size, max_seqlen, dtype=dtype, **kwargs)
