"""VisionMamba against an independent float64 forward; names, keys, registry, options."""

import importlib.util
import os
import subprocess
import sys
import types
import warnings
from collections.abc import MutableMapping

import pytest
import torch

import mamba_ssm
import vim_rpi
from vim_rpi import models_mamba
from vim_reference import vim_forward

TINY_NAME = "vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2"


def _small(seed=0, **kwargs):
    torch.manual_seed(seed)
    model = vim_rpi.create_model("vim_tiny", **kwargs).double().eval()
    with torch.no_grad():  # make every parameter matter (default init leaves biases/D at constants)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("kwargs,img", [
    (dict(depth=2, embed_dim=32, img_size=64), 64),  # patch 16 -> 4x4 grid, 17 tokens
    (dict(depth=3, embed_dim=48, img_size=64, stride=8), 64),  # stride 8 -> 7x7 grid, 50 tokens
    (dict(depth=2, embed_dim=32, img_size=48, num_classes=7), 48),
])
def test_forward_matches_float64_formula(kwargs, img):
    model = _small(**kwargs)
    x = torch.randn(2, 3, img, img, dtype=torch.float64)
    expected = vim_forward(model.state_dict(), x, patch=16, stride=kwargs.get("stride", 16))
    with torch.inference_mode():
        got = model(x)
    assert got.shape == expected.shape
    assert _rel_err(got, expected) < 1e-10
    with torch.no_grad():  # the same without inference mode, and the features path
        assert _rel_err(model(x), expected) < 1e-10
        feats = model(x, return_features=True)
    assert feats.shape == (2, kwargs["embed_dim"])
    assert _rel_err(model.head(feats), expected) < 1e-10


def test_head_cls_token_matches_formula():
    model = _small(depth=2, embed_dim=32, img_size=64, use_middle_cls_token=False)
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        got = model(x)
    assert _rel_err(got, vim_forward(model.state_dict(), x, 16, 16, cls="head")) < 1e-10


def test_float32_training_mode_backward_reaches_every_parameter():
    torch.manual_seed(0)
    model = vim_rpi.create_model("vim_tiny", depth=2, embed_dim=32, img_size=32, num_classes=5)
    model.train()
    loss = model(torch.randn(3, 3, 32, 32)).logsumexp(-1).sum()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "_b" in n)


def test_eval_output_follows_new_weights():
    a, b = _small(0, depth=2, embed_dim=32, img_size=32), _small(1, depth=2, embed_dim=32, img_size=32)
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with torch.inference_mode():
        a(x)  # runs on the weights eval() built
    a.load_state_dict(b.state_dict())
    with torch.inference_mode():
        assert torch.equal(a(x), b(x))


def _expected_tiny_shapes():
    shapes = {"cls_token": (1, 1, 192), "pos_embed": (1, 197, 192), "patch_embed.proj.weight": (192, 3, 16, 16),
              "patch_embed.proj.bias": (192,), "head.weight": (1000, 192), "head.bias": (1000,),
              "norm_f.weight": (192,)}
    per_layer = {"A_log": (384, 16), "D": (384,), "A_b_log": (384, 16), "D_b": (384,), "in_proj.weight": (768, 192),
                 "out_proj.weight": (192, 384)}
    for suffix in ("", "_b"):
        per_layer.update({f"conv1d{suffix}.weight": (384, 1, 4), f"conv1d{suffix}.bias": (384,),
                          f"x_proj{suffix}.weight": (44, 384), f"dt_proj{suffix}.weight": (384, 12),
                          f"dt_proj{suffix}.bias": (384,)})
    for i in range(24):
        shapes.update({f"layers.{i}.mixer.{k}": v for k, v in per_layer.items()})
        shapes[f"layers.{i}.norm.weight"] = (192,)
    return shapes


def test_vim_tiny_state_dict_matches_released_layout():
    with torch.device("meta"):
        model = vim_rpi.create_model(TINY_NAME)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = _expected_tiny_shapes()
    assert len(expected) == 415
    assert got == expected
    assert sum(p.numel() for p in model.parameters()) == 7_148_008


def test_registry_names_aliases_and_errors():
    names = vim_rpi.list_models()
    assert len(names) == 5 and TINY_NAME in names
    for alias, embed, stride in (("vim_tiny", 192, 16), ("vim_tiny_stride8", 192, 8), ("vim_small", 384, 16),
                                 ("vim_small_stride8", 384, 8), ("vim_base", 768, 16)):
        arch = vim_rpi.model_architecture(alias)
        assert (arch["embed_dim"], arch["stride"], arch["depth"]) == (embed, stride, 24)
        assert vim_rpi.is_model(alias)
        # each long name is also a module-level function, like upstream
        assert callable(getattr(models_mamba, vim_rpi.resolve_model_name(alias)))
    with pytest.raises(ValueError, match="vim_tiny"):
        vim_rpi.create_model("vim_tiny_typo")
    assert vim_rpi.pretrained_cfg("vim_tiny")["url"].endswith("vim_t_midclstok_76p1acc.pth")
    assert vim_rpi.pretrained_cfg("vim_base")["url"] is None  # no placeholder URLs


def test_unknown_kwargs_are_named_and_ablations_rejected():
    with pytest.warns(UserWarning, match="drop_block_rate"):
        vim_rpi.create_model("vim_tiny", depth=1, embed_dim=16, img_size=32, drop_block_rate=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # None-valued extras (upstream main.py passes them) are fine
        vim_rpi.create_model("vim_tiny", depth=1, embed_dim=16, img_size=32, drop_block_rate=None,
                                  pretrained_cfg=None)
    for bad in (dict(if_rope=True), dict(flip_img_sequences_ratio=0.5)):
        with pytest.raises(NotImplementedError):
            vim_rpi.create_model("vim_tiny", depth=1, embed_dim=16, img_size=32, **bad)
    model = vim_rpi.create_model("vim_tiny", depth=1, embed_dim=16, img_size=32)
    with pytest.raises(ValueError, match="32"):
        model(torch.randn(1, 3, 64, 64))
    with pytest.raises(NotImplementedError):
        model(torch.randn(1, 3, 32, 32), if_random_token_rank=True)


@pytest.mark.parametrize("kwargs", [
    dict(use_double_cls_token=True),
    dict(if_cls_token=False, final_pool_type="mean"),
    dict(if_cls_token=False, final_pool_type="max"),
    dict(if_bidirectional=True, depth=2),
    dict(fused_add_norm=False),
    dict(rms_norm=False, fused_add_norm=False),
    dict(init_layer_scale=0.5),
])
def test_ablation_options_run(kwargs):
    args = dict(depth=1, embed_dim=16, img_size=32, num_classes=3)
    model = vim_rpi.create_model("vim_tiny", **{**args, **kwargs}).eval()
    with torch.inference_mode():
        y = model(torch.randn(2, 3, 32, 32))
    assert y.shape == (2, 3) and torch.isfinite(y).all()


def test_unfused_norm_path_equals_fused():
    fused = _small(depth=2, embed_dim=32, img_size=32)
    unfused = vim_rpi.create_model("vim_tiny", depth=2, embed_dim=32, img_size=32, fused_add_norm=False)
    unfused = unfused.double().eval()
    unfused.load_state_dict(fused.state_dict())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert _rel_err(unfused(x), fused(x)) < 1e-12


def test_import_needs_neither_timm_nor_torchvision(tmp_path):
    code = ("import sys, vim_rpi.models_mamba, vim_rpi.classifier; "
            "bad = [m for m in ('timm', 'torchvision', 'triton') if m in sys.modules and sys.modules[m] is not None "
            "and getattr(sys.modules[m], '__file__', None)]; print(bad)")
    blocker = tmp_path / "sitecustomize.py"  # make timm/torchvision unimportable, as on a bare Pi
    blocker.write_text("import sys\nfor m in ('timm', 'torchvision'):\n    sys.modules[m] = None\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "[]"


def test_register_with_timm_uses_timms_registry(monkeypatch):
    """timm cannot import on the x86 CI machine: a stand-in with timm's two functions."""
    registered = {}
    fake_models = types.ModuleType("timm.models")
    fake_models.is_model = lambda name: name in registered
    fake_models.register_model = lambda fn: registered.setdefault(fn.__name__, fn)
    fake_timm = types.ModuleType("timm")
    fake_timm.models = fake_models
    monkeypatch.setitem(sys.modules, "timm", fake_timm)
    monkeypatch.setitem(sys.modules, "timm.models", fake_models)
    assert models_mamba.register_with_timm() == 5  # its import-time registration found no timm
    assert models_mamba.register_with_timm() == 0  # no duplicates
    assert sorted(registered) == vim_rpi.list_models()
    model = registered[TINY_NAME](pretrained=False, depth=1, embed_dim=16, img_size=32)
    assert model.model_name == TINY_NAME


# ---- kernels chosen once per model --------------------------------------------------------------

KERNEL_DECISIONS = ("causal_conv1d/backends.py", "mamba_ssm/ops/backends.py", "mamba_ssm/ops/kernel_sets.py",
                    "mamba_ssm/env.py")


class _CountingEnviron(MutableMapping):
    """os.environ that counts every read (os.getenv and os.environ.get go through __getitem__)."""

    def __init__(self, real):
        self.real, self.reads = real, []

    def __getitem__(self, key):
        self.reads.append(key)
        return self.real[key]

    def __iter__(self):
        self.reads.append("<iter>")
        return iter(self.real)

    def __len__(self):
        return len(self.real)

    def __setitem__(self, key, value):
        self.real[key] = value

    def __delitem__(self, key):
        del self.real[key]


def test_warm_vim_tiny_forward_reads_no_environment_and_decides_no_backend(monkeypatch):
    """The default CPU path (backend auto: the fused numba kernels when numba is installed, else
    torch): after the first forward, a forward reads no environment variable and runs nothing of
    the modules that decide backends but `current_backend` (the use_backend conflict check)."""
    torch.manual_seed(0)
    model = vim_rpi.create_model("vim_tiny").eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        model(x)
    environ = _CountingEnviron(os.environ)
    decisions = []

    def profile(frame, event, arg):
        code = frame.f_code
        if event == "call" and code.co_filename.replace(os.sep, "/").endswith(KERNEL_DECISIONS) \
                and code.co_name != "current_backend":
            decisions.append(code.co_name)

    monkeypatch.setattr(os, "environ", environ)
    sys.setprofile(profile)
    try:
        with torch.inference_mode():
            model(x)
    finally:
        sys.setprofile(None)
    assert environ.reads == [] and decisions == []
    report = mamba_ssm.kernel_report(model)
    assert report["mixer"] == report["rms_norm"] == ("numba" if importlib.util.find_spec("numba") else "torch")


@pytest.mark.parametrize("env,dtype", [({"SELECTIVE_SCAN_CPU_BACKEND": "torch"}, "float32"), ({}, "float64")])
def test_torch_path_never_loads_numba(env, dtype):
    """A model on the torch path (the variable says torch, or float64, which the fused numba kernels
    do not take) imports neither numba nor the numba kernel modules, also with numba installed."""
    code = f"""
import sys, torch, vim_rpi
torch.set_default_dtype(torch.{dtype})
model = vim_rpi.create_model('vim_tiny', depth=2, img_size=32).eval()
with torch.inference_mode():
    model(torch.randn(1, 3, 32, 32))
model.train()(torch.randn(1, 3, 32, 32)).sum().backward()
print(sorted(m for m in sys.modules if m.split('.')[0] in ('numba', 'llvmlite')
             or m.endswith(('bimamba_v2_numba', 'selective_scan_numba'))))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_set_backend_reaches_every_mixer_and_norm():
    model = _small(depth=2, embed_dim=32, img_size=32)
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    expected = vim_forward(model.state_dict(), x, patch=16, stride=16)
    assert model.set_backend("ref") is model
    report = mamba_ssm.kernel_report(model)
    assert (report["backend"], report["mixer"], report["selective_scan"], report["causal_conv1d"]) == ("ref",) * 4
    with torch.no_grad():
        assert _rel_err(model(x), expected) < 1e-10
    with pytest.raises(RuntimeError, match="CUDA"):
        model.set_backend("cuda")
    assert mamba_ssm.kernel_report(model)["backend"] == "ref"  # a refused choice changes nothing
