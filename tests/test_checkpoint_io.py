"""The one checkpoint loader: layouts, safety, strictness, resampling, compact copies."""

import argparse
import contextlib
import importlib.util
import io
import os
import subprocess
import threading
import zipfile
from pathlib import Path

import pytest
import torch

from vim_rpi import checkpoint_io, factory
import vim_rpi
from vim_rpi import quantization
from vim_rpi.checkpoint_io import CheckpointError
from vim_rpi.errors import DamagedCheckpointError, DownloadError
from vim_rpi.hub import fetch_checkpoint

REPO = Path(__file__).resolve().parent.parent
SMALL = dict(depth=2, embed_dim=32, img_size=64, num_classes=10)


def _model(seed=0, **kwargs):
    torch.manual_seed(seed)
    return vim_rpi.create_model("vim_tiny", **{**SMALL, **kwargs}).eval()


def _logits(model, size=64, seed=123):
    torch.manual_seed(seed)
    with torch.inference_mode():
        return model(torch.randn(2, 3, size, size))


def _training_layout(model, ema_model):
    """What hustvl/Vim's main.py saves: weights, EMA, optimizer, scheduler, epoch, scaler, args."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(1, 3, 64, 64)).sum().backward()
    opt.step()
    return {"model": model.state_dict(), "model_ema": ema_model.state_dict(), "optimizer": opt.state_dict(),
            "lr_scheduler": {"last_epoch": 3, "base_lrs": [1e-3]}, "epoch": 3, "scaler": None,
            "args": argparse.Namespace(model="vim_tiny", input_size=64, lr=1e-3, data_path="/data", smoothing=0.1)}


@pytest.mark.parametrize("layout", ["training", "bare", "state_dict", "module_prefix"])
def test_round_trip_every_layout(tmp_path, layout):
    model, ema = _model(0), _model(1)
    expected = _logits(model)
    obj = {"training": lambda: _training_layout(model, ema),
           "bare": lambda: model.state_dict(),
           "state_dict": lambda: {"state_dict": model.state_dict()},
           "module_prefix": lambda: {"model": {"module." + k: v for k, v in model.state_dict().items()}}}[layout]()
    path = tmp_path / "ckpt.pth"
    torch.save(obj, path)
    loaded, info = factory.load_model(path, "vim_tiny", depth=2, embed_dim=32, img_size=64)
    assert not loaded.training and info["num_classes"] == 10
    expected = _logits(model) if layout == "training" else expected  # training layout took one step
    torch.testing.assert_close(_logits(loaded), expected, rtol=0, atol=0)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002], ids=["022", "077", "002"])
def test_saved_file_permissions_follow_the_umask_which_is_never_changed(tmp_path, monkeypatch, umask):
    previous = os.umask(umask)
    try:
        # Setting the umask, even for a moment, races with every other thread that creates a file.
        monkeypatch.setattr(os, "umask", lambda mask: pytest.fail("os.umask was called"))
        checkpoint_io.save_checkpoint(tmp_path / "m.pth", _model())
    finally:
        monkeypatch.undo()
        os.umask(previous)
    assert (tmp_path / "m.pth").stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["m.pth"]  # no temporary file left


def test_ema_weights_on_request(tmp_path):
    model, ema = _model(0), _model(1)
    path = tmp_path / "train.pth"
    checkpoint_io.save_checkpoint(path, model, epoch=5, model_ema=ema, args=argparse.Namespace(model="vim_tiny"))
    plain, info = factory.load_model(path)  # name and overrides come from the file
    ema_loaded, _ = factory.load_model(path, ema=True)
    assert info["epoch"] == 5 and info["model"] == vim_rpi.resolve_model_name("vim_tiny")
    assert torch.equal(_logits(plain), _logits(model))
    assert torch.equal(_logits(ema_loaded), _logits(ema))
    torch.save(model.state_dict(), tmp_path / "bare.pth")
    with pytest.raises(CheckpointError, match="EMA"):
        factory.load_model(tmp_path / "bare.pth", "vim_tiny", ema=True, **SMALL)


def _mapped_file(address):
    """The file behind the memory mapping holding `address` (Linux), or None."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        low, high = (int(x, 16) for x in fields[0].split("-"))
        if low <= address < high:
            return fields[5] if len(fields) > 5 else None
    return None


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_weights_are_memory_mapped_not_copied(tmp_path):
    path = tmp_path / "m.pth"
    checkpoint_io.save_checkpoint(path, _model())
    loaded, _ = factory.load_model(path)
    assert {_mapped_file(p.data_ptr()) for p in loaded.parameters()} == {str(path)}


class _WritesAFile:
    """Unpickling this calls Path.write_text: the kind of code a hostile checkpoint runs."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (Path.write_text, (Path(self.target), "pwned"))


def test_pickled_code_is_refused_unless_trusted(tmp_path):
    target = tmp_path / "written_by_unpickling.txt"
    path = tmp_path / "evil.pth"
    torch.save({"model": _model().state_dict(), "payload": _WritesAFile(target)}, path)
    with pytest.raises(CheckpointError, match="trust-checkpoint"):
        factory.load_model(path, "vim_tiny", **SMALL)
    assert not target.exists()
    factory.load_model(path, "vim_tiny", trust_pickle=True, **SMALL)  # explicit opt-in only
    assert target.read_text() == "pwned"


class Marker:
    """A class of this test module: a checkpoint holding one refers to it by name (a GLOBAL)."""

    def __init__(self, value):
        self.value = value


class _MakesADirectory:
    """Unpickling this calls os.mkdir, from a module torch's safe loader blocks outright (its
    message for it differs from the one for an unknown class)."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (str(self.target),))


def _refused(path):
    """The CheckpointError of a safe read of `path`, checked to be a refusal, not damage."""
    with pytest.raises(CheckpointError) as refusal:
        checkpoint_io.read_checkpoint(path)
    assert not isinstance(refusal.value, DamagedCheckpointError), refusal.value
    message = str(refusal.value)
    assert "beyond tensors and plain data" in message and "--trust-checkpoint" in message and "\n" not in message
    return message


def test_refused_code_is_named_and_loads_only_when_trusted(tmp_path):
    state = _model().state_dict()
    target = tmp_path / "made_by_unpickling"
    cases = {
        "class": ({"model": state, "extra": Marker(7)}, {}, f"it refers to {Marker.__module__}.Marker"),
        "blocked module": ({"model": state, "extra": _MakesADirectory(target)}, {},
                           f"it refers to {os.mkdir.__module__}.mkdir"),
        "protocol 4": ({"model": state, "extra": Marker(7)}, {"pickle_protocol": 4}, "pickle protocol 4 or later"),
        "legacy format": ({"model": state, "extra": Marker(7)}, {"_use_new_zipfile_serialization": False},
                          "the legacy format"),
    }
    for name, (obj, options, needle) in cases.items():
        path = tmp_path / f"{name}.pth"
        torch.save(obj, path, **options)
        assert needle in _refused(path), name
        assert not target.exists()  # nothing ran
        loaded = checkpoint_io.read_checkpoint(path, trust_pickle=True)  # the explicit opt-in loads it
        assert torch.equal(loaded["model"]["head.weight"], state["head.weight"])
        if name == "blocked module":
            assert target.is_dir()
            target.rmdir()
        else:
            assert isinstance(loaded["extra"], Marker) and loaded["extra"].value == 7


def test_a_damaged_pickle_is_damaged_even_when_trusted(tmp_path):
    good = tmp_path / "good.pth"
    torch.save({"model": _model().state_dict(), "extra": Marker(7)}, good)
    with zipfile.ZipFile(good) as archive:
        records = {info.filename: archive.read(info) for info in archive.infolist()}
    record = next(name for name in records if name.endswith("/data.pkl"))
    for damage in (lambda data: data[: len(data) // 2], lambda data: data[:40] + b"\xff" * 8 + data[48:]):
        path = tmp_path / "damaged.pth"
        with zipfile.ZipFile(path, "w") as archive:
            for name, data in records.items():
                archive.writestr(name, damage(data) if name == record else data)
        for trust in (False, True):
            with pytest.raises(DamagedCheckpointError, match="not a readable PyTorch checkpoint"):
                checkpoint_io.read_checkpoint(path, trust_pickle=trust)


def _bounded(call, path, timeout=20):
    """call(path) in a thread: its exception, or a failure if it blocks (opening a FIFO waits
    for a writer, which this then provides so the thread ends)."""
    outcome = []

    def run():
        try:
            call(path)
            outcome.append(None)
        except Exception as error:
            outcome.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))  # releases the blocked open
        thread.join(timeout)
        pytest.fail(f"{call.__name__}({path}) blocked")
    return outcome[0]


def test_checkpoint_paths_that_cannot_be_read_are_one_line_errors(tmp_path):
    os.mkfifo(tmp_path / "pipe.pth")
    (tmp_path / "dangling.pth").symlink_to("gone.pth")
    cases = [(tmp_path / ("x" * 300 + ".pth"), "name too long for the file system"),
             (tmp_path / "pipe.pth", "a FIFO (named pipe), not a regular file"),
             (tmp_path / "dangling.pth", "a symbolic link to gone.pth, which does not exist"),
             (tmp_path, "a directory, not a regular file"),
             (tmp_path / "nope.pth", "checkpoint not found")]
    for path, needle in cases:
        for call in (fetch_checkpoint, checkpoint_io.read_checkpoint):
            error = _bounded(call, path)
            assert isinstance(error, (CheckpointError, DownloadError)) and needle in str(error), (call, error)
            assert str(path) in str(error) and "\n" not in str(error)


def test_wrong_model_names_the_fitting_one(tmp_path):
    path = tmp_path / "small.pth"
    torch.save({"model": _model().state_dict()}, path)
    with pytest.raises(CheckpointError) as err:
        factory.load_model(path, "vim_tiny", depth=3, embed_dim=32, img_size=64)
    assert "missing keys" in str(err.value) and "layers.2." in str(err.value)
    with pytest.raises(CheckpointError, match="unknown model"):
        factory.load_model(path, "vim_nano", **SMALL)


def test_released_vim_tiny_layout_loads_and_classifies(tmp_path):
    """Full-size Vim-Tiny in hustvl's layout (no model name stored): the name is inferred."""
    torch.manual_seed(0)
    model = vim_rpi.create_model("vim_tiny").eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / "vim_t_midclstok_76p1acc.pth"
    torch.save({"model": state, "model_ema": state, "optimizer": {"state": {}, "param_groups": []},
                "lr_scheduler": {}, "epoch": 299, "scaler": {"scale": 1.0},
                "args": argparse.Namespace(model=None, input_size=224, lr=5e-4)}, path)
    loaded, info = factory.load_model(path)
    assert info["model"].startswith("vim_tiny_patch16_224") and info["epoch"] == 299
    with pytest.raises(CheckpointError, match="vim_tiny_patch16_224"):
        factory.load_model(path, "vim_small")
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("entries, message", [
    ({"model_args": {"img_size": "x"}}, "img_size must be a positive int, got 'x'"),
    ({"model_args": [1, 2]}, "'model_args' entry must be of type dict, got list"),
    ({"model_args": {1: 2}}, "'model_args' keys must be argument names"),
    ({"model_name": 7}, "'model_name' entry must be of type str, got int"),
    ({"model_args": {**SMALL, "d_state": -4}}, "cannot build vim_tiny"),
])
def test_malformed_metadata_is_a_checkpoint_error(tmp_path, entries, message):
    path = tmp_path / "odd.pth"
    torch.save({"model": _model().state_dict(), "model_name": "vim_tiny", "model_args": dict(SMALL), **entries}, path)
    with pytest.raises(CheckpointError, match=message):
        factory.load_model(path)


@pytest.mark.parametrize("epoch, expected", [(torch.tensor(3), 3), (7, 7), ("last", None), (2.5, None)])
def test_epoch_entry_is_read_leniently(tmp_path, epoch, expected):
    path = tmp_path / "e.pth"
    torch.save({"state_dict": _model().state_dict(), "epoch": epoch}, path)
    _, info = factory.load_model(path, "vim_tiny", **SMALL)
    assert info["epoch"] == expected


def test_model_args_device_and_dtype_are_ignored(tmp_path):
    path = tmp_path / "cuda.pth"
    torch.save({"model": _model().state_dict(), "model_name": "vim_tiny",
                "model_args": {**SMALL, "device": "cuda", "dtype": torch.float16}}, path)
    model, _ = factory.load_model(path)
    assert model.head.weight.device.type == "cpu" and model.head.weight.dtype == torch.float32


def test_a_quantized_state_dict_is_named(tmp_path):
    path = tmp_path / "q.pth"
    torch.save({"model": {"layers.0.mixer.in_proj._packed_params": "packed"}}, path)
    with pytest.raises(CheckpointError, match="'model' entry is not a state dict of tensors"):
        factory.load_model(path, "vim_tiny")


def test_loading_into_another_architecture_warns(tmp_path, caplog):
    path = tmp_path / "tiny.pth"
    checkpoint_io.save_checkpoint(path, _model())
    with caplog.at_level("WARNING", logger="checkpoint_io"):
        factory.load_model(path)
    assert not caplog.records
    with caplog.at_level("WARNING", logger="checkpoint_io"):
        model, info = factory.load_model(path, "vim_tiny_stride8", **SMALL)  # loads: pos_embed resampled
    assert info["model"].startswith("vim_tiny_patch16_stride8")
    assert "holds vim_tiny_patch16_224" in caplog.text and "into vim_tiny_patch16_stride8" in caplog.text
    caplog.clear()
    strided = tmp_path / "stride8.pth"  # the stored overrides say stride 8: no warning
    checkpoint_io.save_checkpoint(strided, _model(stride=8))
    with caplog.at_level("WARNING", logger="checkpoint_io"):
        model, _ = factory.load_model(strided)
        torch.save(_model(stride=8).state_dict(), tmp_path / "bare.pth")  # given as overrides: no warning
        factory.load_model(tmp_path / "bare.pth", "vim_tiny", **SMALL, stride=8)
    assert model.patch_embed.proj.stride == (8, 8) and not caplog.records


def test_strict_mismatch_lists_keys_in_one_message(tmp_path):
    state = _model().state_dict()
    state.pop("norm_f.weight")
    state["layers.0.norm.bias"] = torch.zeros(32)  # what a LayerNorm port would add
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as err:
        factory.load_model(path, "vim_tiny", **SMALL)
    message = str(err.value)
    assert "norm_f.weight" in message and "layers.0.norm.bias" in message and "\n" not in message


@pytest.mark.parametrize("content", [None, "dir", b"not a checkpoint at all", b"PK\x03\x04 truncated zip"])
def test_unreadable_files(tmp_path, content):
    path = tmp_path / "x.pth"
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=str(path)):
        factory.load_model(path, "vim_tiny")


def test_resample_pos_embed_keeps_cls_row_and_is_identity_on_same_grid():
    model = _model()
    pos = model.pos_embed.detach()  # 4x4 grid, cls at index 8
    same = checkpoint_io.resample_pos_embed(pos, [8], 4, [8])
    torch.testing.assert_close(same, pos, rtol=0, atol=1e-6)
    smaller = checkpoint_io.resample_pos_embed(pos, [8], 3, [4])
    assert smaller.shape == (1, 10, 32)
    assert torch.equal(smaller[0, 4], pos[0, 8])
    # a constant grid stays constant under bicubic resampling
    flat = torch.ones(1, 17, 2)
    assert torch.allclose(checkpoint_io.resample_pos_embed(flat, [8], 5, [12]), torch.ones(1, 26, 2))


def test_input_size_resampling(tmp_path):
    torch.manual_seed(0)
    model = vim_rpi.create_model("vim_tiny", depth=1, embed_dim=32).eval()  # a 224 model
    path = tmp_path / "m224.pth"
    checkpoint_io.save_checkpoint(path, model)
    same, info = factory.load_model(path, input_size=224)
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        assert torch.equal(same(x), model(x))
    small, info = factory.load_model(path, input_size=160)
    assert info["input_size"] == 160 and small.pos_embed.shape == (1, 101, 32)
    with torch.inference_mode():
        assert small(torch.randn(1, 3, 160, 160)).shape == (1, 1000)


def _convert(*args):
    spec = importlib.util.spec_from_file_location("convert_checkpoint", REPO / "scripts" / "convert_checkpoint.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = script.main([str(a) for a in args])
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def test_convert_checkpoint_compact_and_half(tmp_path):
    model, ema = _model(0), _model(1)
    src = tmp_path / "train.pth"
    torch.save(_training_layout(model, ema), src)
    out, half, ema_out = tmp_path / "w.pth", tmp_path / "w16.pth", tmp_path / "ema.pth"
    for args in ((src, out, "--model", "vim_tiny"), (src, half, "--half", "--model", "vim_tiny"),
                 (src, ema_out, "--ema", "--model", "vim_tiny")):
        result = _convert(*args)
        assert result.returncode == 0, result.stderr
        assert "MB ->" in result.stdout
    assert os.path.getsize(out) < os.path.getsize(src) and os.path.getsize(half) < 0.6 * os.path.getsize(out)
    loaded, _ = factory.load_model(out, "vim_tiny", **SMALL)
    reference = {k: v for k, v in model.state_dict().items()}
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in reference.items())
    loaded16, _ = factory.load_model(half, "vim_tiny", **SMALL)
    assert all(loaded16.state_dict()[k].dtype == torch.float32 for k in reference)
    assert all(torch.equal(loaded16.state_dict()[k], v.half().float()) for k, v in reference.items())
    loaded_ema, _ = factory.load_model(ema_out, "vim_tiny", **SMALL)
    assert torch.equal(_logits(loaded_ema), _logits(ema))
    failed = _convert(tmp_path / "missing.pth", tmp_path / "o.pth")
    assert failed.returncode == 1 and "not found" in failed.stderr and "Traceback" not in failed.stderr


def test_convert_checkpoint_refuses_a_name_the_weights_do_not_fit(tmp_path):
    torch.manual_seed(0)
    src = tmp_path / "tiny.pth"
    checkpoint_io.save_checkpoint(src, vim_rpi.create_model("vim_tiny", img_size=64))
    refused = _convert(src, tmp_path / "small.pth", "--model", "vim_small")
    assert refused.returncode == 1 and "holds vim_tiny_patch16_224" in refused.stderr and "not vim_small" in refused.stderr
    assert not (tmp_path / "small.pth").exists() and "Traceback" not in refused.stderr
    in_place = _convert(src, src, "--half")  # sizes are read before the file is replaced
    assert in_place.returncode == 0, in_place.stderr
    before, after = (float(part.split(": ")[-1].split(" MB")[0]) for part in in_place.stdout.split(" -> "))
    assert after < 0.6 * before
    _, info = factory.load_model(src)
    assert info["model"].startswith("vim_tiny_patch16_224")
    strided = tmp_path / "stride8.pth"  # its stored overrides (stride 8) make it a vim_tiny: converted
    checkpoint_io.save_checkpoint(strided, vim_rpi.create_model("vim_tiny", stride=8, img_size=64))
    assert _convert(strided, tmp_path / "s8.pth").returncode == 0
    with pytest.raises(SystemExit) as usage:
        _convert(src, tmp_path / "x.pth", "--model", "vim_tinyy")
    assert usage.value.code == 2


def test_dynamic_int8_runs_and_stays_close():
    torch.manual_seed(0)
    model = vim_rpi.create_model("vim_tiny", depth=2, embed_dim=64, img_size=64, num_classes=10).eval()
    x = torch.randn(4, 3, 64, 64)
    with torch.inference_mode():
        ref = model(x)
        quantized = quantization.quantize_model(model, "dynamic-int8")
        got = quantized(x)
    assert not any(type(m) is torch.nn.Linear for m in quantized.modules())
    assert any(type(m) is torch.nn.Linear for m in model.modules())  # the input is left alone
    # int8 weights and activations: a few percent of drift on random weights, same ranking
    assert ((got - ref).norm() / ref.norm()).item() < 0.15
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    assert quantization.quantize_model(model, "none") is model
    with pytest.raises(ValueError, match="dynamic-int8"):
        quantization.quantize_model(model, "int4")
