"""Vision Mamba (Vim): the whole model in one file (it builds; names live in `registry`).

Paper: Zhu et al., "Vision Mamba: Efficient Visual Representation Learning with Bidirectional
State Space Model", ICML 2024. Follows hustvl/Vim `vim/models_mamba.py` (commit 095ecd3):
same constructor arguments and defaults, submodule names (so the released `.pth` files load
strictly), forward and registered model names.

Changes from upstream, on purpose:
  - no timm or torchvision needed: names and configs live in `vim_rpi.registry`, building by
    name in `vim_rpi.factory`; `vim_rpi.models_mamba` registers the names with timm as
    upstream's module does;
  - RMSNorm stays RMSNorm on every machine (pure-PyTorch `mamba_ssm.ops.triton.layer_norm`);
  - the kernels are chosen once per module, not per call: `set_backend(name)` tells every
    mixer and norm (see `mamba_ssm.modules.backend_choice`);
  - the final norm runs only on the token(s) that are read out (it is per token, so the result
    is the same);
  - unknown constructor kwargs are accepted like upstream, but named in a warning; ablation
    options that no released weights use (rope, random sequence flipping, random cls position
    or token order) raise NotImplementedError instead of being half-supported.

Glossary: B batch, M tokens, E embed_dim, grid = (img - patch) // stride + 1 per side.
"""

import math
import warnings
from functools import partial

import torch
import torch.nn as nn

from mamba_ssm.modules.backend_choice import set_backend
from mamba_ssm.modules.mamba_simple import Block, DropPath, Mamba
from mamba_ssm.ops.norms import layer_norm_fn
from mamba_ssm.ops.triton.layer_norm import RMSNorm

__all__ = ["VisionMamba", "PatchEmbed"]


def _pair(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x, x)


class PatchEmbed(nn.Module):
    """(B, C, H, W) image -> (B, grid_h * grid_w, E) patch tokens (a strided conv)."""

    def __init__(self, img_size=224, patch_size=16, stride=16, in_chans=3, embed_dim=768, norm_layer=None,
                 flatten=True):
        super().__init__()
        self.img_size = _pair(img_size)
        self.patch_size = _pair(patch_size)
        self.grid_size = tuple((i - p) // stride + 1 for i, p in zip(self.img_size, self.patch_size))
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.flatten = flatten
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=stride)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x):
        if x.dim() != 4 or tuple(x.shape[2:]) != self.img_size:
            raise ValueError(f"expected images of shape (batch, channels, {self.img_size[0]}, {self.img_size[1]}), "
                             f"got {tuple(x.shape)}; build the model with img_size matching the input")
        x = self.proj(x)  # (B, E, grid_h, grid_w)
        if self.flatten:
            x = x.flatten(2).transpose(1, 2)  # (B, M, E)
        return self.norm(x)


def create_block(d_model, d_state=16, ssm_cfg=None, norm_epsilon=1e-5, drop_path=0.0, rms_norm=False,
                 residual_in_fp32=False, fused_add_norm=False, layer_idx=None, device=None, dtype=None,
                 if_bimamba=False, bimamba_type="none", if_divide_out=False, init_layer_scale=None):
    if if_bimamba:
        bimamba_type = "v1"
    factory_kwargs = {"device": device, "dtype": dtype}
    mixer_cls = partial(Mamba, d_state=d_state, layer_idx=layer_idx, bimamba_type=bimamba_type,
                        if_divide_out=if_divide_out, init_layer_scale=init_layer_scale, **(ssm_cfg or {}),
                        **factory_kwargs)
    norm_cls = partial(RMSNorm if rms_norm else nn.LayerNorm, eps=norm_epsilon, **factory_kwargs)
    block = Block(d_model, mixer_cls, norm_cls=norm_cls, drop_path=drop_path, fused_add_norm=fused_add_norm,
                  residual_in_fp32=residual_in_fp32)
    block.layer_idx = layer_idx
    return block


def _init_weights(module, n_layer, initializer_range=0.02, rescale_prenorm_residual=True, n_residuals_per_layer=1):
    """Mamba's init: zero Linear biases (except dt_proj's), and scale out_proj by 1/sqrt(n_layer)
    (GPT-2's residual-path rule)."""
    if isinstance(module, nn.Linear):
        if module.bias is not None and not getattr(module.bias, "_no_reinit", False):
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=initializer_range)
    if rescale_prenorm_residual:
        for name, p in module.named_parameters():
            if name in ("out_proj.weight", "fc2.weight"):
                # kaiming_uniform_(a=sqrt(5)), i.e. U(+-1/sqrt(fan_in)), then / sqrt(n_residuals * n_layer),
                # drawn in one go (an in-place division would need elementwise ops on the meta device)
                bound = 1.0 / math.sqrt(p.shape[1] * n_residuals_per_layer * n_layer)
                nn.init.uniform_(p, -bound, bound)


def _lecun_normal_(tensor):
    fan_in = tensor[0].numel()
    # 0.8796 is the std of a standard normal truncated to [-2, 2]
    nn.init.trunc_normal_(tensor, std=math.sqrt(1.0 / fan_in) / 0.87962566103423978)


def segm_init_weights(m):
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        _lecun_normal_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d)):
        nn.init.zeros_(m.bias)
        nn.init.ones_(m.weight)


_UNSUPPORTED = {
    "if_rope": "rotary position embeddings (if_rope)",
    "if_rope_residual": "rotary position embeddings on the residual (if_rope_residual)",
}


class VisionMamba(nn.Module):
    """Vim: patch embedding + cls token + depth x bidirectional Mamba blocks + RMSNorm + head.

    Args (upstream's, same defaults):
        img_size, patch_size, stride, channels: patch embedding; grid = (img - patch) // stride + 1.
        depth, embed_dim, d_state, ssm_cfg: the stack of Mamba blocks (ssm_cfg: extra Mamba kwargs).
        num_classes: head size (0: no head, features out).
        drop_rate, drop_path_rate: dropout after pos_embed; stochastic depth (linear in depth).
        norm_epsilon, rms_norm, fused_add_norm, residual_in_fp32: block norms and residual stream.
        if_bidirectional: pairs of layers, the second over the flipped sequence (ablation).
        final_pool_type: 'none' | 'mean' | 'max' | 'all' readout when there is no cls token.
        if_abs_pos_embed: learned absolute position embedding.
        if_bimamba / bimamba_type: mixer type ('v2' for all released weights); if_divide_out: /2.
        if_cls_token, use_double_cls_token, use_middle_cls_token: where the cls token(s) sit:
            middle (index M//2, released weights), head (index 0), or head and tail.
        init_layer_scale: per-block output scale `gamma`.
        if_rope, if_rope_residual, flip_img_sequences_ratio, ft_seq_len, pt_hw_seq_len: rope and
            random flipping ablations: rejected when enabled (no released weights use them).
    """

    def __init__(self, img_size=224, patch_size=16, stride=16, depth=24, embed_dim=192, d_state=16, channels=3,
                 num_classes=1000, ssm_cfg=None, drop_rate=0.0, drop_path_rate=0.1, norm_epsilon: float = 1e-5,
                 rms_norm: bool = True, initializer_cfg=None, fused_add_norm=True, residual_in_fp32=True,
                 device=None, dtype=None, ft_seq_len=None, pt_hw_seq_len=14, if_bidirectional=False,
                 final_pool_type="none", if_abs_pos_embed=True, if_rope=False, if_rope_residual=False,
                 flip_img_sequences_ratio=-1.0, if_bimamba=False, bimamba_type="v2", if_cls_token=True,
                 if_divide_out=True, init_layer_scale=None, use_double_cls_token=False, use_middle_cls_token=True,
                 **kwargs):
        super().__init__()
        self._reject_unsupported(if_rope=if_rope, if_rope_residual=if_rope_residual,
                                 flip_img_sequences_ratio=flip_img_sequences_ratio,
                                 final_pool_type=final_pool_type, if_bidirectional=if_bidirectional, depth=depth)
        ignored = sorted(k for k, v in kwargs.items() if v is not None)
        if ignored:
            warnings.warn(f"VisionMamba ignores these arguments: {', '.join(ignored)}", stacklevel=2)
        factory_kwargs = {"device": device, "dtype": dtype}
        self.residual_in_fp32 = residual_in_fp32
        self.fused_add_norm = fused_add_norm
        self.if_bidirectional = if_bidirectional
        self.final_pool_type = final_pool_type
        self.if_abs_pos_embed = if_abs_pos_embed
        self.if_rope = if_rope
        self.if_rope_residual = if_rope_residual
        self.flip_img_sequences_ratio = flip_img_sequences_ratio
        self.if_cls_token = if_cls_token
        self.use_double_cls_token = use_double_cls_token
        self.use_middle_cls_token = use_middle_cls_token
        self.num_tokens = (2 if use_double_cls_token else 1) if if_cls_token else 0
        self.num_classes = num_classes
        self.d_model = self.num_features = self.embed_dim = embed_dim

        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, stride=stride, in_chans=channels,
                                      embed_dim=embed_dim)
        num_patches = self.patch_embed.num_patches
        if if_cls_token:
            if use_double_cls_token:
                self.cls_token_head = nn.Parameter(torch.zeros(1, 1, embed_dim, **factory_kwargs))
                self.cls_token_tail = nn.Parameter(torch.zeros(1, 1, embed_dim, **factory_kwargs))
            else:
                self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim, **factory_kwargs))
        if if_abs_pos_embed:
            self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + self.num_tokens, embed_dim, **factory_kwargs))
            self.pos_drop = nn.Dropout(p=drop_rate)
        self.head = nn.Linear(embed_dim, num_classes, **factory_kwargs) if num_classes > 0 else nn.Identity()

        dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()  # stochastic depth decay rule
        inter_dpr = [0.0] + dpr  # upstream's off-by-one: block i gets the rate meant for block i-1
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0.0 else nn.Identity()
        self.layers = nn.ModuleList([
            create_block(embed_dim, d_state=d_state, ssm_cfg=ssm_cfg, norm_epsilon=norm_epsilon, rms_norm=rms_norm,
                         residual_in_fp32=residual_in_fp32, fused_add_norm=fused_add_norm, layer_idx=i,
                         if_bimamba=if_bimamba, bimamba_type=bimamba_type, drop_path=inter_dpr[i],
                         if_divide_out=if_divide_out, init_layer_scale=init_layer_scale, **factory_kwargs)
            for i in range(depth)
        ])
        self.norm_f = (RMSNorm if rms_norm else nn.LayerNorm)(embed_dim, eps=norm_epsilon, **factory_kwargs)

        self.patch_embed.apply(segm_init_weights)
        self.head.apply(segm_init_weights)
        if if_abs_pos_embed:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for name in ("cls_token", "cls_token_head", "cls_token_tail"):
            if hasattr(self, name):
                nn.init.trunc_normal_(getattr(self, name), std=0.02)
        self.apply(partial(_init_weights, n_layer=depth, **(initializer_cfg or {})))

    @staticmethod
    def _reject_unsupported(if_rope, if_rope_residual, flip_img_sequences_ratio, final_pool_type, if_bidirectional,
                            depth):
        for name, enabled in (("if_rope", if_rope), ("if_rope_residual", if_rope_residual)):
            if enabled:
                raise NotImplementedError(f"{_UNSUPPORTED[name]} is an upstream ablation without released "
                                          f"weights and is not implemented here")
        if flip_img_sequences_ratio > 0:
            raise NotImplementedError("random sequence flipping (flip_img_sequences_ratio > 0) is an upstream "
                                      "ablation without released weights and is not implemented here")
        if final_pool_type not in ("none", "mean", "max", "all"):
            raise ValueError(f"final_pool_type must be 'none', 'mean', 'max' or 'all', got {final_pool_type!r}")
        if if_bidirectional and depth % 2:
            raise ValueError(f"if_bidirectional pairs the layers: depth must be even, got {depth}")

    def set_backend(self, name):
        """Run kernel backend `name` ("auto", "ref", "torch", "numba", "cuda") in every mixer and
        norm; returns self. Raises RuntimeError when it cannot run here (see
        `mamba_ssm.set_backend`)."""
        return set_backend(self, name)

    def allocate_inference_cache(self, batch_size, max_seqlen, dtype=None, **kwargs):
        return {i: layer.allocate_inference_cache(batch_size, max_seqlen, dtype=dtype, **kwargs)
                for i, layer in enumerate(self.layers)}

    @torch.jit.ignore
    def no_weight_decay(self):
        return {"pos_embed", "cls_token", "dist_token", "cls_token_head", "cls_token_tail"}

    def get_classifier(self):
        return self.head

    def reset_classifier(self, num_classes):
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.head.apply(segm_init_weights)
        if hasattr(self, "model_overrides"):  # what save_checkpoint records to rebuild the model
            self.model_overrides["num_classes"] = num_classes

    def cls_positions(self, num_patches):
        """Indices of the cls token(s) in the token sequence built from num_patches patches."""
        if not self.if_cls_token:
            return []
        if self.use_double_cls_token:
            return [0, num_patches + 1]
        return [num_patches // 2] if self.use_middle_cls_token else [0]

    def _add_cls_tokens(self, x):
        """(B, M, E) patches -> (B, M + num_tokens, E) with the cls token(s) in place."""
        B, M, _ = x.shape
        if not self.if_cls_token:
            return x
        if self.use_double_cls_token:
            return torch.cat((self.cls_token_head.expand(B, -1, -1), x, self.cls_token_tail.expand(B, -1, -1)), dim=1)
        cls = self.cls_token.expand(B, -1, -1)
        if self.use_middle_cls_token:
            return torch.cat((x[:, :M // 2], cls, x[:, M // 2:]), dim=1)
        return torch.cat((cls, x), dim=1)

    def _run_layers(self, hidden, inference_params):
        residual = None
        if not self.if_bidirectional:
            for layer in self.layers:
                hidden, residual = layer(hidden, residual, inference_params=inference_params)
            return hidden, residual
        for forward_layer, backward_layer in zip(self.layers[0::2], self.layers[1::2]):
            hidden_f, residual_f = forward_layer(hidden, residual, inference_params=inference_params)
            hidden_b, residual_b = backward_layer(hidden.flip(1), None if residual is None else residual.flip(1),
                                                  inference_params=inference_params)
            hidden = (hidden_f + hidden_b.flip(1)) / 2
            residual = (residual_f + residual_b.flip(1)) / 2
        return hidden, residual

    def _final_norm(self, hidden, residual):
        if not self.fused_add_norm:
            residual = hidden if residual is None else residual + self.drop_path(hidden)
            return self.norm_f(residual.to(dtype=self.norm_f.weight.dtype))
        if isinstance(self.norm_f, RMSNorm):  # its held kernel
            return self.norm_f.add_norm(self.drop_path(hidden), residual, prenorm=False,
                                        residual_in_fp32=self.residual_in_fp32)
        return layer_norm_fn(self.drop_path(hidden), self.norm_f.weight, self.norm_f.bias, eps=self.norm_f.eps,
                             residual=residual, prenorm=False, residual_in_fp32=self.residual_in_fp32)

    def forward_features(self, x, inference_params=None, if_random_cls_token_position=False,
                         if_random_token_rank=False):
        """(B, C, H, W) -> features: (B, E) from the cls token(s), or per final_pool_type."""
        if if_random_cls_token_position or if_random_token_rank:
            raise NotImplementedError("random cls-token position / token order are upstream ablations and are "
                                      "not implemented here")
        x = self.patch_embed(x)  # (B, M, E)
        positions = self.cls_positions(x.shape[1])
        x = self._add_cls_tokens(x)  # (B, M + num_tokens, E)
        if self.if_abs_pos_embed:
            x = self.pos_drop(x + self.pos_embed)
        hidden, residual = self._run_layers(x, inference_params)
        if positions:
            # the norm is per token: normalise only the cls token(s)
            hidden = hidden[:, positions]
            residual = residual[:, positions] if residual is not None else None
            return self._final_norm(hidden, residual).mean(dim=1)  # (B, E); mean of head+tail for double
        hidden = self._final_norm(hidden, residual)  # (B, M, E)
        if self.final_pool_type == "none":
            return hidden[:, -1, :]
        if self.final_pool_type == "mean":
            return hidden.mean(dim=1)
        return hidden  # 'max' (taken after the head) and 'all'

    def forward_head(self, x, pre_logits=False):
        if pre_logits:
            return x
        x = self.head(x)
        return x.max(dim=1)[0] if self.final_pool_type == "max" and not self.if_cls_token else x

    def forward(self, x, return_features=False, inference_params=None, if_random_cls_token_position=False,
                if_random_token_rank=False):
        """(B, C, H, W) -> logits (B, num_classes), or the features (B, E) when return_features
        (per token, (B, M, ...), for final_pool_type 'all' without a cls token)."""
        x = self.forward_features(x, inference_params, if_random_cls_token_position=if_random_cls_token_position,
                                  if_random_token_rank=if_random_token_rank)
        return self.forward_head(x, pre_logits=return_features)
