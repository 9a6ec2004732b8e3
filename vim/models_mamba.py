"""Upstream's model module, kept for code written against hustvl/Vim: `import models_mamba`
(from inside vim/, as upstream's scripts do) or `from vim_rpi import models_mamba`.

It exposes upstream's five registered model functions, which build the model (and with
`pretrained=True` load the released weights) through `vim_rpi.factory`, plus `VisionMamba`.
Like upstream's module it registers the names with timm when timm imports (timm is never
needed: a missing or broken timm, which raises RuntimeError beside a mismatched torchvision, is
skipped). `default_cfgs` gives timm the Hub location of each name's weights.
"""

from vim_rpi import factory, registry
from vim_rpi.vision_mamba import VisionMamba

__all__ = ["VisionMamba", "register_with_timm", "default_cfgs"]

# timm reads a module's `default_cfgs` when registering its functions
default_cfgs = {name: registry.pretrained_cfg(name) for name in registry.list_models()}


def _entrypoint(name, doc):
    def create(pretrained=False, pretrained_cfg=None, pretrained_cfg_overlay=None, **kwargs):
        # pretrained_cfg / pretrained_cfg_overlay are timm's plumbing: the weights are ours to fetch
        return factory.create_model(name, pretrained=pretrained, **kwargs)

    create.__name__ = create.__qualname__ = name
    create.__module__ = __name__
    create.__doc__ = doc
    globals()[name] = create
    __all__.append(name)
    return create


_ENTRYPOINTS = [_entrypoint(name, registry.description(name)) for name in registry.list_models()]


def register_with_timm():
    """Register the names with timm, so `timm.create_model(name)` works; returns how many were new."""
    from timm.models import is_model as timm_is_model
    from timm.models import register_model as timm_register_model

    new = [fn for fn in _ENTRYPOINTS if not timm_is_model(fn.__name__)]
    for fn in new:
        timm_register_model(fn)
    return len(new)


try:
    register_with_timm()
except Exception:  # timm absent, or broken (a torchvision/torch mismatch raises RuntimeError)
    pass
