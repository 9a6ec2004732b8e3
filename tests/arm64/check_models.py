"""Emulated Raspberry Pi checks: our registered models through timm, and int8 quantization.

timm does not import on the x86 CI machine, so timm's side of the registry is checked here;
run by scripts/ci_arm64.sh.
"""
import pytest
import timm
import torch
import torch.nn as nn

import vim_rpi
from vim_rpi import models_mamba, quantization

# Importing models_mamba registers with timm (timm imports here); registering again is a no-op,
# and returns 0 when nothing was new.
models_mamba.register_with_timm()

SMALL = dict(depth=2, embed_dim=64, img_size=64, num_classes=10)  # a few ms natively, ~1 s emulated
VIM_TINY = "vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2"


def test_every_registered_name_is_known_to_timm():
    names = vim_rpi.list_models()
    assert VIM_TINY in names and len(names) == 5
    assert set(names) <= set(timm.list_models("vim_*"))


@pytest.mark.parametrize("name", vim_rpi.list_models())
def test_timm_create_model_builds_the_same_network(name):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **SMALL).eval()
    assert isinstance(model, models_mamba.VisionMamba)
    ours = vim_rpi.create_model(name, **SMALL).eval()
    ours.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits = model(x)
        expected = ours(x)
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    torch.testing.assert_close(logits, expected)


def test_timm_builds_full_size_vim_tiny():
    with torch.device("meta"):  # shapes only: a full-size init would take minutes emulated
        model = timm.create_model(VIM_TINY, pretrained=False)
    state = model.state_dict()
    assert len(state) == 415
    assert sum(p.numel() for p in model.parameters()) == 7_148_008
    assert state["pos_embed"].shape == (1, 197, 192)


def test_dynamic_int8_runs_on_this_cpu_and_stays_close():
    torch.manual_seed(0)
    model = vim_rpi.create_model("vim_tiny", **SMALL).eval()
    quantized = quantization.quantize_model(model, "dynamic-int8")
    assert not any(type(m) is nn.Linear for m in quantized.modules())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        logits = quantized(x)
    assert ((logits - expected).norm() / expected.norm()).item() < 0.1
