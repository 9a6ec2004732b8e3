"""The registry of Vim model names: architectures and pretrained configs, as plain data.

No torch and no model code here (timm's `_registry.py` split): the model file builds, the
factory (`vim_rpi.factory`) turns a name into a model, and everything that only needs to know
about names (argument checks, `--help`, the server's info page) stays cheap to import.

Each registered name has:
  - an architecture: the `VisionMamba` constructor kwargs that differ from its defaults;
  - a pretrained config (weights and data settings, never architecture): where the released
    weights live on the Hugging Face Hub (`hf_hub_id`, `hf_hub_filename`), num_classes,
    input_size, crop_pct, interpolation, mean, std;
  - a short alias (`vim_tiny`...) and a one-line description. The long names are upstream's
    (hustvl/Vim `models_mamba.py`, whose functions `vim_rpi.models_mamba` makes from this list).
"""

import difflib

__all__ = ["IMAGENET_DEFAULT_MEAN", "IMAGENET_DEFAULT_STD", "DEFAULT_CROP_PCT", "DEFAULT_MODEL",
           "list_models", "is_model", "resolve_model_name", "model_architecture", "pretrained_cfg", "description"]

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
DEFAULT_CROP_PCT = 0.875  # resize the short side to input_size / 0.875, then center-crop
DEFAULT_MODEL = "vim_tiny"  # what the front ends run when no model or checkpoint is named

_architectures = {}  # canonical name -> architecture kwargs of that name
_aliases = {}  # short name -> canonical name
_pretrained_cfgs = {}  # canonical name -> weights and data settings
_descriptions = {}  # canonical name -> one line: the variant, its tokens, its published top-1

# The architecture shared by every released model (hustvl/Vim's registered functions).
VIM_V2 = dict(patch_size=16, depth=24, rms_norm=True, residual_in_fp32=True, fused_add_norm=True,
              final_pool_type="mean", if_abs_pos_embed=True, if_rope=False, if_rope_residual=False,
              bimamba_type="v2", if_cls_token=True, if_divide_out=True, use_middle_cls_token=True)


def _cfg(hf_hub_id=None, hf_hub_filename=None, **kwargs):
    return {
        "hf_hub_id": hf_hub_id,
        "hf_hub_filename": hf_hub_filename,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "crop_pct": DEFAULT_CROP_PCT,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "apache-2.0",
        **kwargs,
    }


def _register(name, alias, description, cfg, **arch):
    if name in _architectures or alias in _aliases:
        raise ValueError(f"model name {name!r} (alias {alias!r}) is already registered")
    _architectures[name] = {**VIM_V2, **arch}
    _aliases[alias] = name
    _descriptions[name] = description
    _pretrained_cfgs[name] = cfg


# name, alias, description, Hub repository, released file (None: not published), embed_dim, stride
for _name, _alias, _description, _repo, _file, _dim, _stride in (
    ("vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2", "vim_tiny",
     "Vim-Tiny, 197 tokens (76.1% top-1).", "hustvl/Vim-tiny-midclstok", "vim_t_midclstok_76p1acc.pth", 192, 16),
    ("vim_tiny_patch16_stride8_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2", "vim_tiny_stride8",
     "Vim-Tiny+, stride 8, 730 tokens (78.3% top-1).", "hustvl/Vim-tiny-midclstok", "vim_t_midclstok_ft_78p3acc.pth",
     192, 8),
    ("vim_small_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2", "vim_small",
     "Vim-Small, 197 tokens (80.5% top-1).", "hustvl/Vim-small-midclstok", "vim_s_midclstok_80p5acc.pth", 384, 16),
    ("vim_small_patch16_stride8_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2", "vim_small_stride8",
     "Vim-Small+, stride 8, 730 tokens (81.6% top-1).", "hustvl/Vim-small-midclstok",
     "vim_s_midclstok_ft_81p6acc.pth", 384, 8),
    ("vim_base_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_middle_cls_token_div2", "vim_base",
     "Vim-Base, 197 tokens (81.9% top-1).", "hustvl/Vim-base-midclstok", None, 768, 16),
):
    _register(_name, _alias, _description, _cfg(_repo, _file), embed_dim=_dim, stride=_stride)


def list_models(pattern=None, include_aliases=False):
    """Sorted registered names (optionally containing `pattern`); aliases too when asked."""
    names = list(_architectures) + (list(_aliases) if include_aliases else [])
    return sorted(n for n in names if pattern is None or pattern in n)


def is_model(name):
    return name in _architectures or name in _aliases


def resolve_model_name(name):
    """Canonical registered name for a name or alias; ValueError suggesting close matches."""
    if name in _architectures:
        return name
    if name in _aliases:
        return _aliases[name]
    close = difflib.get_close_matches(name, list_models(include_aliases=True), n=3, cutoff=0.4)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown model {name!r}.{hint} Known models: {', '.join(list_models(include_aliases=True))}")


def model_architecture(name):
    """The full constructor kwargs a registered name stands for."""
    return dict(_architectures[resolve_model_name(name)])


def description(name):
    """One line about a registered name: the variant, its token count, its published top-1."""
    return _descriptions[resolve_model_name(name)]


def pretrained_cfg(name):
    """Weights and data settings of a registered name: hf_hub_id, hf_hub_filename, url,
    input_size, crop_pct, interpolation, mean, std..."""
    cfg = dict(_pretrained_cfgs[resolve_model_name(name)])
    cfg["url"] = (f"https://huggingface.co/{cfg['hf_hub_id']}/resolve/main/{cfg['hf_hub_filename']}"
                  if cfg["hf_hub_filename"] else None)
    return cfg
