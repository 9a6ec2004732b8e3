"""main.py --eval: real ImageFolder trees and a random-weight checkpoint, checked against a direct
computation in the test (load, transform, forward, metrics), with one process and with torchrun."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vim_rpi import checkpoint_io, factory, image_preprocess
from vim_rpi import engine
from vim_rpi import folder_dataset
from vim_rpi import main
import vim_rpi

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "vim" / "main.py"
SIZE = 32  # model input side: 4 patches of 16 px, so a forward costs milliseconds

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(args, timeout=120, torchrun=False):
    """Run main.py (optionally under torchrun with 2 processes); returns (code, stdout, stderr)."""
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
                if torchrun else [sys.executable])
    done = subprocess.run([*launcher, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS="1"))
    return done.returncode, done.stdout, done.stderr


def _write_image(path, rng, size):
    """A random-colour image with noise; the format follows the file extension."""
    pixels = rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)
    pixels[: size[1] // 2] = rng.integers(0, 256, 3, dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=95) if path.suffix.lower() in (".jpg", ".jpeg") \
        else Image.fromarray(pixels).save(path)


def _make_tree(root, files_per_class, seed):
    """root/<class>/... with mixed extensions, sizes and a nested folder; returns the expected
    ImageFolder samples [(path, class index)]: classes sorted by name (uppercase first), files
    of a class folder before those of its sub-folders, by name within a folder."""
    rng = np.random.default_rng(seed)
    names = ["b_dog", "a_cat", "Zebra", "c_owl"]
    suffixes = [".jpg", ".png", ".JPEG", ".bmp"]
    expected = []
    count = 0
    for index, name in enumerate(sorted(names)):
        for i in range(files_per_class[index]):
            sub = "nested/" if i == 2 else ""
            path = root / name / f"{sub}img{i}{suffixes[count % 4]}"
            _write_image(path, rng, (30 + 7 * (count % 5), 40 - 3 * (count % 3)))
            expected.append((str(path), index))
            count += 1
        (root / name / "notes.txt").write_text("not an image")
    return expected


def _direct_eval(model, samples, num_classes):
    """Per-sample (top-1 hit, top-5 hit, cross-entropy) computed one image at a time."""
    results = []
    with torch.no_grad():
        for path, target in samples:
            x = image_preprocess.eval_transform(image_preprocess.load_image(path), SIZE)
            logits = model(x.unsqueeze(0))[0]
            order = torch.argsort(logits, descending=True).tolist()
            loss = F.cross_entropy(logits.unsqueeze(0), torch.tensor([target])).item()
            results.append((order[0] == target, target in order[: min(5, num_classes)], loss))
    return results


def _check(stats, per_sample):
    assert stats["count"] == len(per_sample)
    assert stats["correct1"] == sum(r[0] for r in per_sample)
    assert stats["correct5"] == sum(r[1] for r in per_sample)
    assert stats["loss"] == pytest.approx(sum(r[2] for r in per_sample) / len(per_sample), rel=1e-5)
    assert stats["acc1"] == pytest.approx(100.0 * stats["correct1"] / stats["count"])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("main_eval")
    torch.manual_seed(0)
    # 7 classes: top-5 is a real subset, and each of the 4 folder classes can score any logit.
    model = vim_rpi.create_model("vim_tiny", depth=2, embed_dim=32, num_classes=7, img_size=SIZE)
    ckpt = root / "tiny.pth"
    checkpoint_io.save_checkpoint(ckpt, model)
    data = root / "data"
    samples = _make_tree(data / "val", [3, 3, 3, 3], seed=1)
    reference, _ = factory.load_model(ckpt)
    return {"ckpt": ckpt, "data": data, "samples": samples, "direct": _direct_eval(reference, samples, 7)}


def test_folder_dataset_follows_imagefolder_rules(setup):
    dataset = folder_dataset.FolderDataset(setup["data"] / "val", load=image_preprocess.load_image)
    assert dataset.classes == ["Zebra", "a_cat", "b_dog", "c_owl"]
    assert dataset.class_to_idx == {name: i for i, name in enumerate(dataset.classes)}
    assert dataset.samples == setup["samples"]
    image, target = dataset[4]
    assert image.mode == "RGB" and target == 1


def test_eval_matches_direct_computation(setup):
    code, out, err = _run(["--eval", "--resume", setup["ckpt"], "--data-path", setup["data"],
                           "--batch-size", 3, "--json"])
    assert code == 0, err
    assert "Traceback" not in err
    report = json.loads(out)  # the progress bar is on stderr only
    assert "eval: 100%" in err and "\r" not in err  # stderr is a pipe: plain lines, no redraws
    assert report["data"] == str(setup["data"] / "val") and report["world_size"] == 1
    _check(report["eval"], setup["direct"])
    # the folders are fewer than the model's classes: allowed, with a warning
    assert "4 class folders, the model 7 classes" in err


def test_flat_layout_limit_and_text_output(setup, capsys):
    """DIR/<class>/... works without val/; --limit takes evenly spread images (in process)."""
    flat = setup["data"] / "val"
    code = main.main(["--eval", "--resume", str(setup["ckpt"]), "--data-path", str(flat), "--limit", "5",
                      "--threads", "1", "-q"])
    out, err = capsys.readouterr()
    assert code == 0
    assert "100%" not in err  # -q hides the progress bar
    picked = [setup["direct"][i] for i in (0, 2, 4, 7, 9)]  # i * 12 // 5
    hits1, hits5 = sum(r[0] for r in picked), sum(r[1] for r in picked)
    loss = sum(r[2] for r in picked) / 5
    assert f"5 images: top-1 {100 * hits1 / 5:.3f}% ({hits1}), top-5 {100 * hits5 / 5:.3f}% ({hits5})" in out
    assert float(out.split("loss ")[-1]) == pytest.approx(loss, rel=1e-5)


@pytest.mark.slow
def test_torchrun_two_processes_give_the_single_process_totals(tmp_path, setup):
    """7 images on 2 ranks (4 + 3): no image padded in twice or dropped; only rank 0 prints."""
    data = tmp_path / "odd"
    samples = _make_tree(data, [2, 1, 3, 1], seed=2)
    model, _ = factory.load_model(setup["ckpt"])
    direct = _direct_eval(model, samples, 7)
    code, out, err = _run(["--eval", "--resume", setup["ckpt"], "--data-path", data, "--batch-size", 2,
                           "--json"], torchrun=True)
    assert code == 0, err
    report = json.loads(out)  # exactly one JSON document: rank 1 printed nothing
    assert report["world_size"] == 2
    _check(report["eval"], direct)


def test_shards_cover_every_index_once():
    for size in (0, 1, 7, 12):
        for world in (1, 2, 3, 5):
            shards = [engine.shard(range(size), rank, world) for rank in range(world)]
            assert sorted(i for s in shards for i in s) == list(range(size))
            assert max(map(len, shards)) - min(map(len, shards)) <= 1


def _garbage(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG not really")
    return path


@pytest.mark.parametrize("case, code, message", [
    ("missing data", 4, "data: no such file; --data-path takes a folder"),
    ("data path too long", 4, "name too long"),
    ("data path is a file", 4, "not a directory; --data-path takes a folder"),
    ("no class folders", 4, "no class folders"),
    ("empty class", 4, "no images in 1 class folder"),
    ("corrupt image", 4, "bad.png"),
    ("too many classes", 4, "9 class folders but the model predicts 7"),
    ("missing checkpoint", 3, "checkpoint not found"),
    ("bad checkpoint", 3, "bad.pth"),
    ("unknown model", 2, "unknown model 'vim_tiniest'"),
    ("cuda", 2, "--device cuda"),
    ("no checkpoint", 2, "--eval needs"),
    ("zero batch", 2, "--batch-size must be >= 1"),
])
def test_bad_inputs_give_one_clear_line(tmp_path, setup, capsys, case, code, message):
    data, ckpt = tmp_path / "data", str(setup["ckpt"])
    args = ["--eval", "--resume", ckpt, "--data-path", str(data), "--threads", "1", "-q"]
    if case == "no class folders":
        (data / "val").mkdir(parents=True)
        (data / "val" / "loose.jpg").write_bytes(b"")
    elif case == "data path too long":
        data.mkdir()
        args[4] = str(data / ("x" * 300))
    elif case == "data path is a file":
        _garbage(data)
    elif case == "empty class":
        _make_tree(data, [1, 1, 1, 1], seed=3)
        (data / "empty").mkdir()
    elif case == "corrupt image":
        _make_tree(data, [1, 1, 1, 1], seed=3)
        _garbage(data / "a_cat" / "bad.png")
    elif case == "too many classes":
        for i in range(9):
            _write_image(data / f"k{i}" / "x.png", np.random.default_rng(i), (20, 20))
    elif case in ("missing checkpoint", "bad checkpoint"):
        bad = _garbage(tmp_path / "bad.pth") if case == "bad checkpoint" else tmp_path / "none.pth"
        args[2] = str(bad)
        _make_tree(data, [1, 1, 1, 1], seed=3)
    elif case == "unknown model":
        args += ["--model", "vim_tiniest"]
    elif case == "cuda":
        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
        args += ["--device", "cuda"]
    elif case == "no checkpoint":
        args = ["--eval", "--data-path", str(data)]
    elif case == "zero batch":
        args += ["--batch-size", "0"]
    try:
        status = main.main(args)
    except SystemExit as exit_:  # argparse's usage errors
        status = exit_.code
    err = capsys.readouterr().err
    assert status == code
    assert message in err
    assert "Traceback" not in err
    assert len([line for line in err.splitlines() if "error" in line]) == 1


def test_unreadable_image_in_a_worker_process(tmp_path, setup, capsys):
    """Re-raised from a DataLoader worker process, the message is still the one line."""
    data = tmp_path / "data"
    _make_tree(data, [1, 1, 1, 1], seed=4)
    _garbage(data / "b_dog" / "broken.jpg")
    code = main.main(["--eval", "--resume", str(setup["ckpt"]), "--data-path", str(data),
                      "--num-workers", "2", "--threads", "1", "-q"])
    captured = capsys.readouterr()
    assert code == 4 and captured.out == ""
    lines = captured.err.strip().splitlines()
    assert lines[-1].startswith("error: cannot read ") and "broken.jpg" in lines[-1]
    assert "Traceback" not in captured.err
