"""Reading, filtering and writing Vim checkpoints: the one safe reader every entry point uses
(building a model for a checkpoint is `vim_rpi.factory.load_model`).

Accepted files: a released training checkpoint (a dict with 'model', 'model_ema', 'optimizer',
'lr_scheduler', 'epoch', 'scaler' and 'args' as an argparse.Namespace), a bare state dict, a
dict with 'state_dict', and the files `save_checkpoint` / scripts/convert_checkpoint.py write
(which also hold 'model_name' and 'model_args' so the model can be rebuilt from the file alone).

Safety: files are read with torch.load(weights_only=True) (argparse.Namespace allow-listed);
anything else in the pickle is refused unless the caller explicitly trusts the file.
Memory: files are memory-mapped and `load_into` makes the chosen state dict's tensors the
model's parameters (`load_state_dict(assign=True)`), so with a model built on the meta device a
115 MB released file costs about its 28 MB of weights in RSS, not its full size.
"""

import argparse
import io
import math
import operator
import os
import pickle
import pickletools
import warnings
import zipfile

import torch
import torch.nn.functional as F

from vim_rpi import paths
from vim_rpi.errors import CheckpointError, DamagedCheckpointError, option
from vim_rpi.temp_files import make_temp_file

__all__ = ["CheckpointError", "read_checkpoint", "extract_state_dict", "read_state_dict", "infer_architecture",
           "checkpoint_filter_fn", "load_into", "model_record", "save_checkpoint", "save_weights"]

_PREFIXES = ("module.", "_orig_mod.")
_CONTAINER_KEYS = ("model", "model_ema", "state_dict")


def read_checkpoint(path, *, trust_pickle=False):
    """torch.load the file at `path` on the CPU, memory-mapped when the format allows it.

    Tensors and plain data load with weights_only=True; a file that holds more (a class, a
    function: code that unpickling would run) loads only with `trust_pickle`.
    Raises:
        CheckpointError: no regular file at `path` (the message says why); a file holding more
            than tensors and plain data without `trust_pickle` (the message names the globals it
            refers to); a trusted file whose unpickling failed.
        DamagedCheckpointError: not a readable checkpoint (truncated, corrupted, another kind of
            file), whatever `trust_pickle` says.
    """
    path = os.fspath(path)
    problem = paths.named_file_problem(path, "checkpoint")
    if problem is not None:
        raise CheckpointError(problem)
    mmap = zipfile.is_zipfile(path)  # torch's legacy (non-zip) format cannot be memory-mapped
    with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
        # torch warns that its safe loader may not read a pickle of protocol 4 or later: the
        # refusal below says so in its one line
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.")  # torch.serialization or its unpickler
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError:
            # torch raises this one type for a refused global, for an opcode its safe loader does
            # not read and for a damaged stream alike, with wordings that change between releases:
            # the pickle itself tells them apart.
            refused = _refused_content(path, mmap)
        except Exception as err:
            detail = str(err).strip().splitlines()[0] if str(err).strip() else "no detail"
            raise DamagedCheckpointError(f"{path} is not a readable PyTorch checkpoint ({type(err).__name__}: "
                                         f"{detail})") from None
    if refused is None:
        raise DamagedCheckpointError(f"{path} is not a readable PyTorch checkpoint (the pickle stream is damaged or "
                                     f"not a checkpoint)")
    if not trust_pickle:
        raise CheckpointError(f"{path} holds Python objects beyond tensors and plain data ({refused}), which could run "
                              f"code when loaded. It was not loaded. If you trust where the file came from, allow it "
                              f"with {option('trust_checkpoint')}.")
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as err:
        raise CheckpointError(f"{path} could not be loaded even as a trusted pickle ({type(err).__name__}: {err})") \
            from None


# A legacy (non-zip) file is a run of pickles: magic number, protocol version, system info, the
# object, its storage keys; the raw storage bytes follow.
_LEGACY_PICKLES = 5


def _refused_content(path, is_zip):
    """What torch's safe loader refused in the checkpoint at `path` ("it refers to
    module.Class, ..."), or None when its pickle stream is damaged. Called inside the safe-globals context of the load,
    so the globals allowed there are not named.

    The stream is walked with pickletools, which decodes opcodes and runs nothing: a stream that
    parses to its end is whole, and what was refused is then code: the globals torch names with
    its public get_unsafe_globals_in_checkpoint, which reads the zip format's pickles of protocol
    2 and 3 (torch.save's default); other files are refused without the names.
    """
    try:
        if is_zip:
            with zipfile.ZipFile(path) as archive:
                record = next(name for name in archive.namelist() if name.rsplit("/", 1)[-1] == "data.pkl")
                pickles, count = io.BytesIO(archive.read(record)), 1
        else:
            pickles, count = open(path, "rb"), _LEGACY_PICKLES
        with pickles:
            for _ in range(count):
                for _ in pickletools.genops(pickles):
                    pass
    except Exception:  # a truncated or mangled stream, a zip without data.pkl
        return None
    try:
        names = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # the legacy format, or opcodes torch's scan does not read either
        names = []
    if not names:
        return ("content torch's safe loader refuses; what it refers to is not listed for a file of the legacy "
                "format or of pickle protocol 4 or later")
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return f"it refers to {shown}"


def _strip_prefixes(state_dict):
    def strip(key):
        for prefix in _PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix):]
        return key

    return {strip(k): v for k, v in state_dict.items()}


def _is_state_dict(obj):
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def extract_state_dict(obj, *, ema=False, source="checkpoint"):
    """(state_dict, meta) from a loaded checkpoint object; picks 'model' (or 'model_ema')."""
    meta = {}
    if isinstance(obj, dict) and any(k in obj for k in _CONTAINER_KEYS):
        key = "model_ema" if ema else ("model" if "model" in obj else "state_dict")
        if key not in obj:
            what = "EMA weights ('model_ema')" if ema else "model weights ('model' or 'state_dict')"
            raise CheckpointError(f"{source} has no {what}; it holds: {', '.join(map(str, obj))}")
        if not _is_state_dict(obj[key]):
            raise CheckpointError(f"{source}: its '{key}' entry is not a state dict of tensors "
                                  f"(a quantized or otherwise converted model cannot be loaded)")
        state_dict = obj[key]
        args = obj.get("args")
        meta = {
            "epoch": obj.get("epoch"),
            "model_name": obj.get("model_name") or getattr(args, "model", None),
            "model_args": obj.get("model_args"),
            "input_size": getattr(args, "input_size", None),
        }
    elif _is_state_dict(obj):
        if ema:
            raise CheckpointError(f"{source} is a bare state dict: it has no EMA weights")
        state_dict = obj
    else:
        raise CheckpointError(f"{source} does not contain a model state dict")
    return _strip_prefixes(state_dict), _checked_meta(meta, source)


def _checked_meta(meta, source):
    """The metadata with the types factory.load_model relies on, or a CheckpointError naming the entry.
    'device'/'dtype' in model_args are dropped: they say where a model was built, not what it is."""
    epoch = meta.get("epoch")
    try:  # only reported: an epoch stored as a tensor or a numpy integer is fine, anything else ignored
        meta = {**meta, "epoch": None if epoch is None or isinstance(epoch, bool) else operator.index(epoch)}
    except TypeError:
        meta = {**meta, "epoch": None}
    kinds = {"model_name": str, "model_args": dict, "input_size": int}
    for key, kind in kinds.items():
        value = meta.get(key)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            raise CheckpointError(f"{source}: its '{key}' entry must be of type {kind.__name__}, "
                                  f"got {type(value).__name__}")
    args = meta.get("model_args")
    if args is not None:
        if not all(isinstance(k, str) for k in args):
            raise CheckpointError(f"{source}: its 'model_args' keys must be argument names (strings)")
        img_size = args.get("img_size")
        if img_size is not None and (not isinstance(img_size, int) or isinstance(img_size, bool) or img_size < 1):
            raise CheckpointError(f"{source}: its model_args img_size must be a positive int, got {img_size!r}")
        meta = {**meta, "model_args": {k: v for k, v in args.items() if k not in ("device", "dtype")}}
    return meta


def read_state_dict(path, *, ema=False, trust_pickle=False):
    """(state_dict, meta) of the file at `path`; meta has epoch, model_name, model_args, input_size."""
    obj = read_checkpoint(path, trust_pickle=trust_pickle)
    state_dict, meta = extract_state_dict(obj, ema=ema, source=os.fspath(path))
    del obj  # keep only the chosen state dict (the rest of the file stays unmapped)
    return state_dict, meta


def infer_architecture(state_dict, img_size=224):
    """What the state dict says about the model: embed_dim, depth, patch_size, stride, num_classes."""
    try:
        proj = state_dict["patch_embed.proj.weight"]  # (E, C, patch, patch)
    except KeyError:
        raise CheckpointError("the state dict has no 'patch_embed.proj.weight': it is not a Vim checkpoint") from None
    depth = len({k.split(".")[1] for k in state_dict if k.startswith("layers.")})
    head = state_dict.get("head.weight")
    arch = {"embed_dim": proj.shape[0], "channels": proj.shape[1], "patch_size": proj.shape[-1], "depth": depth,
            "num_classes": head.shape[0] if head is not None else 0}
    if "pos_embed" in state_dict:
        n_cls = 2 if "cls_token_head" in state_dict else int("cls_token" in state_dict)
        grid = math.isqrt(state_dict["pos_embed"].shape[1] - n_cls)
        if grid > 1 and (img_size - arch["patch_size"]) % (grid - 1) == 0:
            arch["stride"] = (img_size - arch["patch_size"]) // (grid - 1)
        arch["grid"] = grid
    return arch


def _describe_mismatch(model, state_dict, limit=8):
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    parts = []
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if items:
            more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
            parts.append(f"{len(items)} {title}: {', '.join(items[:limit])}{more}")
    return "; ".join(parts)


def resample_pos_embed(pos_embed, old_positions, new_grid, new_positions):
    """Resample a (1, old_tokens, E) position embedding to a new patch grid: the patch rows are
    interpolated bicubically as a 2-D grid, the cls-token rows are kept and re-inserted at
    `new_positions`. Returns (1, new_grid^2 + len(new_positions), E)."""
    n_tokens, dim = pos_embed.shape[1], pos_embed.shape[2]
    keep = [i for i in range(n_tokens) if i not in old_positions]
    old_grid = math.isqrt(len(keep))
    patches = pos_embed[0, keep].float().reshape(1, old_grid, old_grid, dim).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    rows = list(patches.permute(0, 2, 3, 1).reshape(new_grid * new_grid, dim).to(pos_embed.dtype).unbind(0))
    for position, old in sorted(zip(new_positions, old_positions)):
        rows.insert(position, pos_embed[0, old])
    return torch.stack(rows).unsqueeze(0)


def checkpoint_filter_fn(state_dict, model):
    """Adapt a state dict to `model`: resample pos_embed to the model's patch grid; float16/bfloat16
    weights (a --half file) become float32. Returns a new dict."""
    out = {k: (v.float() if v.is_floating_point() and v.dtype != torch.float32 else v)
           for k, v in state_dict.items()}
    pos = out.get("pos_embed")
    if pos is not None and hasattr(model, "pos_embed") and pos.shape != model.pos_embed.shape:
        n_cls = model.num_tokens
        old_patches = pos.shape[1] - n_cls
        if math.isqrt(old_patches) ** 2 != old_patches or pos.shape[2] != model.pos_embed.shape[2]:
            return out  # not a square grid we can resample: let the strict check report it
        out["pos_embed"] = resample_pos_embed(pos, model.cls_positions(old_patches), model.patch_embed.grid_size[0],
                                              model.cls_positions(model.patch_embed.num_patches))
    return out


def load_into(model, state_dict, *, source="checkpoint", fitting=()):
    """Strictly load `state_dict` into `model` (tensors are assigned, not copied). On any
    mismatch raise one CheckpointError listing missing/unexpected keys and shapes; `fitting`
    names the registered models the weights would fit."""
    state_dict = checkpoint_filter_fn(state_dict, model)
    problems = _describe_mismatch(model, state_dict)
    if problems:
        name = getattr(model, "model_name", type(model).__name__)
        hint = f" The checkpoint fits: {', '.join(fitting)}." if fitting else ""
        raise CheckpointError(f"{source} does not match model {name}: {problems}.{hint}")
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model


def model_record(model):
    """'model_name' and 'model_args' entries that let `factory.load_model` rebuild `model` from a file."""
    return {"model_name": getattr(model, "model_name", None), "model_args": dict(getattr(model, "model_overrides", {}))}


def _atomic_save(obj, path):
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = make_temp_file(directory, prefix=".tmp-", suffix=".pth")
    os.close(fd)
    try:
        try:
            torch.save(obj, tmp)
        except RuntimeError as exc:  # torch's zip writer reports a full disk this way
            raise OSError(f"cannot write {path}: {exc}") from None
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def save_checkpoint(path, model, *, optimizer=None, lr_scheduler=None, epoch=None, model_ema=None, scaler=None,
                    args=None):
    """Write the released training-checkpoint layout ('model', 'optimizer', 'lr_scheduler',
    'epoch', 'scaler', 'args', and 'model_ema' when given) plus 'model_name'/'model_args';
    written to a temporary file and renamed, so a crash never leaves a half file."""
    ckpt = {"model": model.state_dict(),
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "lr_scheduler": lr_scheduler.state_dict() if lr_scheduler is not None else None,
            "epoch": epoch,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "args": args if args is not None else argparse.Namespace(model=getattr(model, "model_name", None)),
            **model_record(model)}
    if model_ema is not None:
        ckpt["model_ema"] = model_ema.state_dict()
    _atomic_save(ckpt, path)


def save_weights(path, state_dict, *, model_name=None, model_args=None, half=False):
    """Write a compact weights-only file ('model', 'model_name', 'model_args'); with half, floating
    tensors are stored as float16 (the loader turns them back into float32)."""
    if half:
        state_dict = {k: v.half() if v.is_floating_point() else v for k, v in state_dict.items()}
    else:
        state_dict = {k: v.contiguous() for k, v in state_dict.items()}
    _atomic_save({"model": state_dict, "model_name": model_name, "model_args": dict(model_args or {})}, path)
