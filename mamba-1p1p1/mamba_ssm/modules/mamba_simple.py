"""The Mamba mixer (with Vim's bidirectional variants) and the residual Block around it.

Glossary: b batch, l sequence length, d_model model width, d_inner = expand * d_model, n
d_state, r dt_rank, w d_conv.

Constructor arguments, parameter names (checkpoint keys) and results are upstream's
(state-spaces/mamba 1.1.1 as extended by hustvl/Vim). Differences on purpose:
  - every path computes what upstream's fused CUDA path computes. `use_fast_path=False` runs a
    "v2" mixer unfused, as upstream does: two one-direction inner paths on the conv and scan
    kernels, instead of the stacked or fused mixer kernel; unlike upstream's unfused path it
    keeps the backward direction (the _b parameters and the /2). "v1" and "none" mixers have
    one path;
  - the kernels are chosen once per module (`backend_choice.KernelHolder`: when built, moved,
    loaded or told a backend with `set_backend`), not per call;
  - in eval mode a "v2" mixer holds its inference weights (`ops.bimamba_v2.V2Weights`: A =
    -exp(A_log), stacked layouts), built once by the first inference forward (or by
    `build_inference_constants`) after eval(), load_state_dict, `.to()`/`.half()`... or
    `set_backend`, which drop them, as does a forward with autograd on (an optimizer step may
    follow it). Parameters changed in place after that build by other means (a `.data` write or
    an in-place op under no_grad, a Linear layer swapped by quantize_dynamic(inplace=True), a
    `torch.func.functional_call` under no_grad) are not seen until eval() or
    `build_inference_constants` runs again. Training mode and forwards with autograd on build
    the weights from the parameters on every call;
  - Linear layers may be replaced by dynamically quantized ones (they have no `.weight`
    tensor): in_proj and out_proj are called; a v2 mixer's x_proj runs from its packed int8
    weights on the stacked paths, dequantized in the composed one, and dt_proj's weights are
    dequantized into the mixer on every path.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from mamba_ssm.modules.backend_choice import KernelHolder
from mamba_ssm.ops.bimamba_v2 import DirectionWeights, V2Weights, fp32, stack_directions
from mamba_ssm.ops.norms import layer_norm_fn
from mamba_ssm.ops.selective_scan_interface import inner_projections
from mamba_ssm.ops.triton.layer_norm import RMSNorm
from mamba_ssm.ops.triton.selective_state_update import selective_state_update

BIMAMBA_TYPES = ("none", "v1", "v2")


def dense_linear(linear):
    """(weight, bias) of a Linear as float tensors, also for a dynamically quantized Linear."""
    weight = linear.weight
    if isinstance(weight, torch.Tensor):
        return weight, linear.bias
    return weight().dequantize(), linear.bias()


def is_int8(linear):
    """Whether `linear` is a dynamically quantized int8 Linear."""
    return not isinstance(linear.weight, torch.Tensor) and linear.weight().dtype == torch.qint8


def packed_int8(linear):
    """An int8 Linear's (`is_int8`) weights packed for torch.ops.quantized.linear_dynamic (what
    its forward computes with)."""
    return torch.ops.quantized.linear_prepack(linear.weight(), linear.bias())


class Mamba(KernelHolder, nn.Module):
    """Selective state-space mixer: (b, l, d_model) -> (b, l, d_model).

    bimamba_type: "none" (causal, one direction), "v1" (second scan with A_b over the flipped
    sequence, shared conv/projections) or "v2" (Vim: a full second set of parameters for the
    flipped sequence). if_divide_out halves the v2 sum; init_layer_scale adds a `gamma` scale;
    use_fast_path=False runs a v2 mixer unfused (see the module docstring).
    `set_backend(name)` chooses its kernels (see `backend_choice`).
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
        self._constants = None  # V2Weights of eval-mode inference (v2 mixers), once built
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
        self._init_kernels()

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

    def _kernel_request(self):
        weight = self.in_proj.weight  # a method of a dynamically quantized Linear, whose output is float32
        dtype = weight.dtype if isinstance(weight, torch.Tensor) else torch.float32
        needs = ("mixer", "conv") if self.bimamba_type == "v2" else ("inner", "conv", "scan")
        uniform = all(p.dtype == dtype for p in self.parameters() if p.is_floating_point())
        return dict(device=self.A_log.device.type, dtype=dtype, needs=needs, channels=self.d_inner,
                    uniform=uniform, fused_mixer=self.use_fast_path)

    def _kernels_changed(self):
        """Drop the held inference weights: the next inference forward in eval mode builds them."""
        self._constants = None

    def _inference_weights(self):
        """The v2 inference weights this module holds in eval mode, built now if they are not."""
        if self._constants is None:
            with torch.no_grad():
                self._constants = self._v2_weights(self._kernels.inference)
        return self._constants

    def forward(self, hidden_states, inference_params=None):
        """hidden_states: (b, l, d_model) -> (b, l, d_model)."""
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.d_model:
            raise ValueError(f"hidden_states must have shape (batch, seqlen, {self.d_model}), "
                             f"got {tuple(hidden_states.shape)}")
        kernels = self.kernels_for_call()
        if inference_params is not None:
            return self._forward_with_cache(kernels, hidden_states, inference_params)
        xz = self.in_proj(hidden_states)  # (b, l, 2 * d_inner)
        if self.bimamba_type == "v2":
            if kernels.mode == "inference" and not self.training:
                weights = self._inference_weights()
            else:
                # autograd on: built from the parameters now; an optimizer step may follow, so the
                # held inference weights go too (the next inference forward rebuilds them)
                self._constants = None
                weights = self._v2_weights(kernels)
            y = kernels.mixer(xz, weights, self.if_divide_out)  # (b, l, d_inner)
        else:
            y = self._inner(kernels, xz.transpose(1, 2)).transpose(1, 2)
        return self._scale(self.out_proj(y))

    def _scale(self, out):
        return out * self.gamma if self.init_layer_scale is not None else out

    def _direction(self, suffix="", pack=False):
        """One direction's weights ("" forward, "_b" backward) as tensors the kernels take; with
        pack, an int8 x_proj as its packed weights instead of dequantized ones."""
        conv, x_proj = getattr(self, "conv1d" + suffix), getattr(self, "x_proj" + suffix)
        packed = packed_int8(x_proj) if pack else None  # pack: both directions' x_proj are int8
        dt_weight, dt_bias = dense_linear(getattr(self, "dt_proj" + suffix))
        return DirectionWeights(conv_weight=conv.weight, conv_bias=conv.bias,
                                x_proj_weight=None if packed is not None else dense_linear(x_proj)[0],
                                dt_weight=dt_weight, dt_bias=dt_bias, A=-torch.exp(fp32(getattr(self, f"A{suffix}_log"))),
                                D=fp32(getattr(self, "D" + suffix)), x_proj_packed=packed)

    def _v2_weights(self, kernels):
        """Both directions' weights as `kernels`' mixer reads them: stacked, or per direction."""
        if not kernels.mixer_reads_stacked:
            return V2Weights(self._direction(), self._direction("_b"), None)
        # the stacked kernels read one x_proj layout for the pair: packed only when both are int8
        pack = is_int8(self.x_proj) and is_int8(self.x_proj_b)
        return V2Weights(None, None, stack_directions(self._direction(pack=pack), self._direction("_b", pack=pack)))

    def _inner(self, kernels, xz):
        """The v1 / causal inner path on the held kernels: xz (b, 2*d_inner, l) -> (b, d_inner, l)."""
        w = self._direction()
        A_b = -torch.exp(fp32(self.A_b_log)) if self.bimamba_type == "v1" else None
        return kernels.inner(xz, w.conv_weight, w.conv_bias, w.x_proj_weight, w.dt_weight, w.A, D=w.D,
                             delta_bias=fp32(w.dt_bias), delta_softplus=True, A_b=A_b)

    def __getstate__(self):
        state = super().__getstate__()
        state["_constants"] = None  # derived from the parameters: rebuilt on load
        return state

    def _forward_with_cache(self, kernels, hidden_states, inference_params):
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
        x = kernels.conv(x, self.conv1d.weight.squeeze(1), self.conv1d.bias, activation=self.activation)
        w = self._direction()
        delta, B, C = inner_projections(x, w.x_proj_weight, w.dt_weight)
        y, last_state = kernels.scan(x, delta, w.A, B, C, D=w.D, z=z, delta_bias=fp32(w.dt_bias), delta_softplus=True,
                                     return_last_state=True)
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
        x = self.kernels_for_call().conv_update(x, conv_state, self.conv1d.weight.squeeze(1), self.conv1d.bias,
                                                self.activation)
        dt, B, C = torch.split(self.x_proj(x), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = self.dt_proj(dt)  # bias included, so no dt_bias below
        A = -torch.exp(fp32(self.A_log))
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
    """Build now, from the current parameters, the inference weights every v2 mixer of `model` in
    eval mode holds: at model load, so that the first image costs what the next ones do
    (Vim-Tiny: ~6 ms, 24 x ~20 small ops), and after changing parameters in place in eval mode
    once a forward has run (e.g. quantize_dynamic(inplace=True))."""
    for module in model.modules():
        if isinstance(module, Mamba) and module.bimamba_type == "v2" and not module.training:
            module._kernels_changed()
            module._inference_weights()


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
                residual = fp32(residual)
        else:
            x = hidden_states if residual is None else self.drop_path(hidden_states)
            if isinstance(self.norm, RMSNorm):  # the norm's held kernel (the fused numba one on that path)
                hidden_states, residual = self.norm.add_norm(x, residual, prenorm=True,
                                                             residual_in_fp32=self.residual_in_fp32)
            else:
                hidden_states, residual = layer_norm_fn(x, self.norm.weight, self.norm.bias, residual=residual,
                                                        eps=self.norm.eps, prenorm=True,
                                                        residual_in_fp32=self.residual_in_fp32)
        return self.mixer(hidden_states, inference_params=inference_params), residual

    def allocate_inference_cache(self, batch_size, max_seqlen, dtype=None, **kwargs):
        return self.mixer.allocate_inference_cache(batch_size, max_seqlen, dtype=dtype, **kwargs)
