"""Models by name or by checkpoint: the one place that builds a Vim model.

    create_model("vim_tiny")                      random weights, registered architecture
    create_model("vim_tiny", pretrained=True)     the released weights (fetched once, cached)
    load_model("ckpt.pth")                        the model a checkpoint holds, loaded strictly

Checkpoints are fetched by `vim_rpi.hub` (a path, a URL, or a Hub reference such as the released
weights'); a cached download that turns out to be damaged is fetched again once, on its own.

Both build on the meta device when weights follow, so parameters are allocated once, as the
checkpoint's (memory-mapped) tensors.
"""

import logging
import os

import torch

from vim_rpi import checkpoint_io, hub, registry
from vim_rpi.errors import CheckpointError, ConfigError, DamagedCheckpointError, DownloadError, option, quoted
from vim_rpi.vision_mamba import VisionMamba

__all__ = ["create_model", "load_model", "fits", "fitting_models", "default_checkpoint"]

_log = logging.getLogger(__name__)


def create_model(name, pretrained=False, *, progress=False, **kwargs):
    """Build registered model `name` (or alias); kwargs override its architecture.

    pretrained: load the released weights named by its pretrained cfg (fetched once, cached).
    progress: show a download progress bar on stderr.
    The model carries `model_name`, `model_overrides` (what `save_checkpoint` records) and
    `pretrained_cfg` (data settings: input_size, crop_pct, mean, std...).
    """
    name = registry.resolve_model_name(name)
    if not pretrained:
        return _build(name, kwargs)
    path, (state_dict, _) = _fetch_and_read(default_checkpoint(name), progress)
    with torch.device("meta"):
        model = _build(name, kwargs)
    checkpoint_io.load_into(model, state_dict, source=str(path))
    return model


def _build(name, overrides):
    model = VisionMamba(**{**registry.model_architecture(name), **overrides})
    model.model_name = name
    model.model_overrides = {k: v for k, v in overrides.items() if k not in ("device", "dtype")}
    model.pretrained_cfg = model.default_cfg = registry.pretrained_cfg(name)
    return model


def default_checkpoint(name=None):
    """The Hub reference ("hf-hub:OWNER/REPO/FILE") of the released weights of registered model
    `name` (default: the default model)."""
    name = registry.resolve_model_name(name or registry.DEFAULT_MODEL)
    cfg = registry.pretrained_cfg(name)
    if cfg["hf_hub_filename"] is None:
        raise ConfigError(f"no released weights are known for {name}; pass a file as {option('checkpoint')}")
    return hub.hub_reference(cfg["hf_hub_id"], cfg["hf_hub_filename"])


def _fetch_and_read(spec, progress, **read_options):
    """(local file, (state_dict, meta)) for checkpoint `spec`. A cached download that does not
    load (a damaged file) is fetched again once; the warning and any error name the cached file."""
    path = hub.fetch_checkpoint(spec, progress=progress)
    try:
        return path, checkpoint_io.read_state_dict(path, **read_options)
    except DamagedCheckpointError as damaged:
        if not hub.is_remote(spec):
            raise
        _log.warning("warning: %s; it is a cached download of %s: fetching it again", damaged, spec)
        try:
            path = hub.fetch_checkpoint(spec, progress=progress, refetch=True)
        except DownloadError as err:
            raise DownloadError(f"{quoted(damaged)}; it is a cached download of {spec}, and fetching it again "
                                f"failed: {quoted(err)}") from None
    return path, checkpoint_io.read_state_dict(path, **read_options)


def fits(arch, name, overrides=None):
    """Whether weights of architecture `arch` (from `checkpoint_io.infer_architecture`) are those
    of registered model `name` built with constructor `overrides`."""
    expected = {**registry.model_architecture(name), **(overrides or {})}
    return all(expected.get(k) == arch.get(k) for k in ("embed_dim", "depth", "patch_size", "stride"))


def fitting_models(arch):
    """Registered names whose architecture (with its defaults) matches `arch`."""
    return [name for name in registry.list_models() if fits(arch, name)]


def load_model(checkpoint=None, model_name=None, *, ema=False, trust_pickle=False, input_size=None,
               progress=False, **model_kwargs):
    """Build the Vim model for a checkpoint and load it strictly, in eval mode.

    checkpoint: a local path, an http(s) URL or a Hub reference "hf-hub:OWNER/REPO/FILE"
        (downloaded once into the cache), or None for the released weights of `model_name` (of
        the default model when that is None too).
    model_name: a registered name or alias; None means the name stored in the file or the
        registered architecture that fits the weights.
    ema: use the 'model_ema' weights of a training checkpoint.
    trust_pickle: allow arbitrary pickled objects (only for files from a trusted source).
    input_size: image side to run at; when it differs from the checkpoint's, pos_embed is
        resampled (fewer tokens is faster, at some accuracy cost).
    progress: show a download progress bar on stderr.
    model_kwargs: further architecture overrides.
    Returns (model, info) with info: model, checkpoint (the local file), num_classes,
    input_size, trained_input_size, epoch, ema.
    Raises CheckpointError / DownloadError with a message for the user.
    """
    if checkpoint is None:
        checkpoint = default_checkpoint(model_name)
    path, (state_dict, meta) = _fetch_and_read(checkpoint, progress, ema=ema, trust_pickle=trust_pickle)
    source = os.fspath(path)
    _log.info("loaded %s", source)
    stored_args = dict(meta.get("model_args") or {})
    trained_size = stored_args.get("img_size") or meta.get("input_size") or 224
    arch = checkpoint_io.infer_architecture(state_dict, img_size=trained_size)
    stored_name = meta.get("model_name")
    fitting = [stored_name] if stored_name and registry.is_model(stored_name) else fitting_models(arch)
    if model_name is None:
        if not fitting:
            raise CheckpointError(f"cannot tell which model {source} is for (embed_dim {arch['embed_dim']}, depth "
                                  f"{arch['depth']}); pass {option('model')}, one of: "
                                  f"{', '.join(registry.list_models())}")
        model_name = fitting[0]
    try:
        name = registry.resolve_model_name(model_name)
    except ValueError as err:
        raise CheckpointError(str(err)) from None
    if fitting and registry.resolve_model_name(fitting[0]) != name:
        stored_args = {}  # the stored overrides describe another model
    kwargs = {**stored_args, "num_classes": arch["num_classes"], **model_kwargs}
    kwargs["img_size"] = input_size or kwargs.get("img_size") or trained_size
    try:
        with torch.device("meta"):
            model = _build(name, kwargs)
    except (TypeError, ValueError, AssertionError, NotImplementedError, RuntimeError) as err:
        raise CheckpointError(f"cannot build {name} with {kwargs} (from {source} and the options given): "
                              f"{err}") from None
    checkpoint_io.load_into(model, state_dict, source=source, fitting=[f for f in fitting if f != name])
    if fitting and not fits(arch, name, kwargs):
        _log.warning("warning: %s holds %s weights; loading them into %s as asked", source, " / ".join(fitting), name)
    model.eval()
    info = {"model": name, "checkpoint": source, "num_classes": arch["num_classes"], "input_size": kwargs["img_size"],
            "trained_input_size": trained_size, "epoch": meta.get("epoch"), "ema": ema}
    return model, info
