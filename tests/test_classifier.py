"""vim_rpi.Classifier: every input kind gives the same tensor, batched equals one by one and
equals a direct forward of the loaded model, options that cannot work are ConfigErrors, and the
object never touches os.environ."""

import argparse
import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import vim_rpi
from causal_conv1d import backends
from mamba_ssm.ops import backends as scan_backends
from vim_rpi import Classifier, checkpoint_io, cli, image_preprocess
from vim_rpi.errors import CheckpointError, ConfigError, ImageError, ImageTooLargeError
from vim_rpi.image_budget import DEFAULT_MAX_IMAGE_MB


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = vim_rpi.create_model("vim_tiny", depth=2, embed_dim=64, img_size=64, num_classes=10)
    torch.nn.init.normal_(model.head.weight, std=1.0)  # spread logits: the top-k order is not a tie
    path = tmp_path_factory.mktemp("ckpt") / "small.pth"
    checkpoint_io.save_checkpoint(path, model)
    return path


@pytest.fixture(scope="module")
def clf(checkpoint, one_thread):
    env = dict(os.environ)
    classifier = Classifier(checkpoint, threads=1)
    assert dict(os.environ) == env  # it never writes the environment
    return classifier


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    pixels = np.random.default_rng(1).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    path = tmp_path_factory.mktemp("img") / "photo.png"
    Image.fromarray(pixels).save(path)
    return path, pixels


def test_every_input_kind_gives_the_same_tensor(clf, photo):
    path, pixels = photo
    want = image_preprocess.eval_transform(Image.fromarray(pixels), 64)
    for image in (path, str(path), path.read_bytes(), Image.open(path), Image.fromarray(pixels), pixels):
        assert torch.equal(clf.preprocess(image), want), type(image)


def test_classify_equals_a_direct_forward_and_batches(clf, photo):
    path, pixels = photo
    flipped = np.ascontiguousarray(pixels[:, ::-1])
    one = clf.classify(path, topk=3)
    with torch.no_grad():
        probs = torch.softmax(clf.model(clf.preprocess(path).unsqueeze(0))[0], -1)
    top = probs.topk(3)
    assert [e["index"] for e in one.topk] == top.indices.tolist()
    assert [e["label"] for e in one.topk] == [f"class {i}" for i in top.indices.tolist()]
    np.testing.assert_allclose([e["prob"] for e in one.topk], top.values.tolist(), rtol=1e-5)
    assert set(one.timing_ms) == {"preprocess", "inference"}
    both = clf.classify_batch([path, flipped], topk=3)
    assert [e["index"] for e in both[0].topk] == [e["index"] for e in one.topk]
    assert [e["index"] for e in both[1].topk] == [e["index"] for e in clf.classify(flipped, topk=3).topk]
    assert both[0].timing_ms["inference"] == both[1].timing_ms["inference"]  # one forward
    assert clf.classify_batch([]) == []


@pytest.mark.parametrize("bad,message", [
    (b"", "empty"), (b"GIF89a not really", "not an image"), (np.zeros((4, 4), np.uint8), "(height, width, 3)"),
    (np.zeros((4, 4, 3), np.float32), "uint8"), ("missing.jpg", "no such file"),
])
def test_bad_images_are_image_errors(clf, bad, message):
    with pytest.raises(ImageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        clf.classify(bad)


def test_truncated_bytes(clf, photo):
    buffer = io.BytesIO()
    Image.fromarray(photo[1]).save(buffer, "JPEG")
    with pytest.raises(ImageError, match="truncated or corrupt"):
        clf.classify(buffer.getvalue()[:200])


def test_other_types_are_type_errors(clf):
    with pytest.raises(TypeError, match="path, bytes, a PIL image or a numpy array"):
        clf.classify(42)


@pytest.mark.parametrize("topk,message", [(0, ">= 1"), (11, "at most the model's 10 classes"), (True, ">= 1")])
def test_bad_topk(clf, topk, message):
    with pytest.raises(ConfigError, match=message):
        clf.classify(np.zeros((8, 8, 3), np.uint8), topk=topk)


@pytest.mark.parametrize("kwargs,message", [
    (dict(model="vim_tinny"), "Did you mean: vim_tiny"), (dict(threads=0), "--threads"),
    (dict(quantize="int4"), "--quantize"), (dict(input_size=8), "--input-size"),
    (dict(backend="gpu"), "unknown backend 'gpu'"), (dict(device="meta"), "only cpu and cuda"), (dict(device="tpu"), "not a device name"),
    (dict(backend="cuda"), "causal_conv1d_cuda"), (dict(model="vim_base"), "no released weights"),
    (dict(max_image_mb=0), "--max-image-mb must be a number > 0"), (dict(max_image_mb="64"), "--max-image-mb"),
    (dict(max_image_mb=float("nan")), "--max-image-mb"),
])
def test_options_that_cannot_work_fail_before_loading(checkpoint, kwargs, message):
    spec = None if kwargs.get("model") == "vim_base" else checkpoint
    with pytest.raises(ConfigError, match=message):
        Classifier(spec, **kwargs)


def test_unavailable_numba_backend_is_a_config_error(checkpoint, monkeypatch):
    monkeypatch.setattr(scan_backends, "numba_installed", lambda: False)
    with pytest.raises(ConfigError, match="numba is not installed"):
        Classifier(checkpoint, backend="numba")


def test_checkpoint_errors_and_backend_is_applied(checkpoint, tmp_path, photo):
    with pytest.raises(CheckpointError, match="not found"):
        Classifier(tmp_path / "missing.pth")
    ref = Classifier(checkpoint, backend="ref", warmup=False)
    assert ref.info()["backend"]["selective_scan"] == "ref"
    fast = Classifier(checkpoint, backend="torch", warmup=False)
    got, want = fast.classify(photo[0], topk=10), ref.classify(photo[0], topk=10)
    np.testing.assert_allclose([e["prob"] for e in got.topk], [e["prob"] for e in want.topk], rtol=1e-4)
    assert backends.current_backend() == "auto"  # the choice applies inside the forwards only


def test_a_head_smaller_than_five_classes_works_with_the_defaults(tmp_path):
    """A fine-tuned 3-class checkpoint: warm-up and the default top-k adapt to the head."""
    torch.manual_seed(0)
    model = vim_rpi.create_model("vim_tiny", depth=2, embed_dim=64, img_size=64, num_classes=3)
    checkpoint_io.save_checkpoint(tmp_path / "three.pth", model)
    clf = Classifier(tmp_path / "three.pth")  # warms up
    assert [e["label"] for e in clf.classify(np.zeros((8, 8, 3), np.uint8)).topk] != []
    assert len(clf.classify(np.zeros((8, 8, 3), np.uint8)).topk) == 3
    with pytest.raises(ConfigError, match="at most the model's 3 classes"):
        clf.classify(np.zeros((8, 8, 3), np.uint8), topk=5)


# --- The memory budget per image ---

def test_budget_default_and_info(clf):
    assert clf.max_image_mb == DEFAULT_MAX_IMAGE_MB == 128
    assert clf.info()["max_image_mb"] == DEFAULT_MAX_IMAGE_MB


def test_images_over_the_budget_are_refused_in_every_form(checkpoint, tmp_path, one_thread):
    """600 x 600 RGB is 1.4 MB decoded: over a 1 MB budget whether it comes as a file, bytes,
    a PIL image or an array; a 100 x 100 image still classifies."""
    small = Classifier(checkpoint, threads=1, max_image_mb=1, warmup=False)
    pixels = np.full((600, 600, 3), 90, np.uint8)
    path = tmp_path / "big.png"
    Image.fromarray(pixels).save(path)
    for image, name in ((path, str(path)), (path.read_bytes(), "image"), (Image.fromarray(pixels), "image"),
                        (pixels, "image array")):
        with pytest.raises(ImageTooLargeError) as info:
            small.classify(image)
        message = str(info.value)
        assert message.startswith(f"{name}: a 600x600 RGB image needs ") and "\n" not in message
        assert "over the 1 MB budget per image" in message and "--max-image-mb" in message
    assert len(small.classify(pixels[:100, :100], topk=3).topk) == 3
    roomy = Classifier(checkpoint, threads=1, max_image_mb=2, warmup=False)
    assert len(roomy.classify(path, topk=3).topk) == 3


def test_budget_flag_is_shared_by_the_front_ends():
    parser = argparse.ArgumentParser()
    cli.add_model_arguments(parser)
    assert parser.parse_args([]).max_image_mb == DEFAULT_MAX_IMAGE_MB
    assert parser.parse_args(["--max-image-mb", "64.5"]).max_image_mb == 64.5


def test_cli_reports_an_image_over_budget_as_one_failed_item(checkpoint, tmp_path, main_in_process):
    big, small = tmp_path / "big.png", tmp_path / "small.png"
    Image.new("RGB", (600, 600), (9, 99, 199)).save(big)
    Image.new("RGB", (64, 64), (199, 9, 99)).save(small)
    code, out, err = main_in_process(["-c", checkpoint, "-t", "1", "--max-image-mb", "1", "--json", big, small])
    assert code == 4 and "Traceback" not in err
    results = json.loads(out)["results"]
    assert [r["image"] for r in results] == [str(big), str(small)]
    assert "over the 1 MB budget per image" in results[0]["error"] and "topk" in results[1]
    assert f"error: {big}: a 600x600 RGB image needs " in err
    code, out, err = main_in_process(["-c", checkpoint, "--max-image-mb", "0", small])
    assert code == 2 and "--max-image-mb: must be a number > 0, got '0'" in err and out == ""
