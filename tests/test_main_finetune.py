"""main.py fine-tuning on the CPU: a generated dataset of coloured squares, a tiny random-weight
checkpoint with a different class count, the saved checkpoints reloaded, and --resume checked
against an uninterrupted run."""

import argparse
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from vim_rpi import checkpoint_io, factory
from vim_rpi import engine
from vim_rpi import folder_dataset
from vim_rpi import image_preprocess
from vim_rpi import main
import vim_rpi

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "vim" / "main.py"
COLOURS = {"blue": (40, 60, 220), "green": (40, 200, 60), "red": (220, 40, 40)}
# Settings under which the tiny model learns the colours in a few epochs, in a second or two.
# One thread: tiny ops on a busy 2-core machine are many times slower with two.
TRAIN_ARGS = ["--epochs", "4", "--batch-size", "8", "--lr", "1e-2", "--warmup-epochs", "1",
              "--drop-path", "0", "--weight-decay", "0.01", "--threads", "1", "-q"]

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # the module fixture fine-tunes for seconds


def _square(rng, colour, side=36):
    """A coloured square at a random place on a noisy grey background: (side, side, 3) uint8."""
    pixels = np.full((side, side, 3), rng.integers(60, 200)) + rng.integers(-25, 26, (side, side, 3))
    size = int(rng.integers(14, 22))
    top, left = rng.integers(0, side - size, 2)
    pixels[top:top + size, left:left + size] = np.array(colour) + rng.integers(-20, 21, 3)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _make_dataset(root, n_train, n_val, seed=0):
    rng = np.random.default_rng(seed)
    for split, count in (("train", n_train), ("val", n_val)):
        for name, colour in COLOURS.items():
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                Image.fromarray(_square(rng, colour)).save(root / split / name / f"{i}.png")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("main_finetune")
    _make_dataset(root / "data", n_train=8, n_val=5)
    torch.manual_seed(0)
    model = vim_rpi.create_model("vim_tiny", depth=2, embed_dim=32, num_classes=5, img_size=32)
    checkpoint_io.save_checkpoint(root / "init.pth", model)
    return {"root": root, "data": root / "data", "init": root / "init.pth"}


@pytest.fixture(scope="module")
def finetuned(setup):
    """One real command-line fine-tune: 5-class checkpoint -> 3-class dataset, with EMA."""
    out = setup["root"] / "run"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--finetune", str(setup["init"]), "--data-path", str(setup["data"]),
         "--output-dir", str(out), "--model-ema", "--model-ema-decay", "0.9", "--json", *TRAIN_ARGS],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return {"out": out, "report": json.loads(done.stdout), "stderr": done.stderr}


def test_finetune_learns(finetuned):
    report = finetuned["report"]
    assert "Traceback" not in finetuned["stderr"]
    assert "has 5 classes, the dataset 3: training a new head" in finetuned["stderr"]
    assert "100%" not in finetuned["stderr"]  # -q hides the progress bars
    epochs = report["epochs"]
    assert [e["epoch"] for e in epochs] == [0, 1, 2, 3]
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    assert report["eval"]["count"] == 15
    assert report["eval"]["acc1"] >= 80.0  # chance is 33 %


def test_checkpoint_layout_and_reload(finetuned, setup):
    out = finetuned["out"]
    ckpt = checkpoint_io.read_checkpoint(out / "checkpoint.pth")
    assert {"model", "model_ema", "optimizer", "lr_scheduler", "epoch", "scaler", "args"} <= set(ckpt)
    assert ckpt["epoch"] == 3 and ckpt["scaler"] is None
    assert isinstance(ckpt["args"], argparse.Namespace) and ckpt["args"].lr == 1e-2
    assert ckpt["model"]["head.weight"].shape == (3, 32)
    assert (out / "best_checkpoint.pth").is_file()
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [entry["epoch"] for entry in log] == [0, 1, 2, 3]

    # The reloaded weights reproduce the last reported evaluation, image by image.
    model, info = factory.load_model(out / "checkpoint.pth")
    assert info["num_classes"] == 3 and info["input_size"] == 32
    correct, loss = 0, 0.0
    with torch.no_grad():
        for target, name in enumerate(sorted(COLOURS)):
            for path in sorted((setup["data"] / "val" / name).iterdir()):
                x = image_preprocess.eval_transform(image_preprocess.load_image(path), 32)
                logits = model(x.unsqueeze(0))
                correct += int(logits.argmax(1).item() == target)
                loss += torch.nn.functional.cross_entropy(logits, torch.tensor([target])).item()
    final = finetuned["report"]["eval"]
    assert final["correct1"] == correct
    assert final["loss"] == pytest.approx(loss / 15, rel=1e-5)

    ema, _ = factory.load_model(out / "checkpoint.pth", ema=True)
    assert not torch.equal(ema.head.weight, model.head.weight)


def _train_in_process(setup, out, epochs, resume=False):
    start = ["--resume", str(out / "checkpoint.pth")] if resume else ["--finetune", str(setup["init"])]
    args = [*start, "--data-path", str(setup["data"]), "--output-dir", str(out), "--model-ema", *TRAIN_ARGS]
    args[args.index("--epochs") + 1] = str(epochs)
    assert main.main(args) == 0


def test_resume_continues_like_an_uninterrupted_run(tmp_path, setup):
    """2 epochs in one go == 1 epoch, then --resume for the 2nd: same weights, EMA, optimizer."""
    _train_in_process(setup, tmp_path / "straight", epochs=2)
    _train_in_process(setup, tmp_path / "split", epochs=1)
    _train_in_process(setup, tmp_path / "split", epochs=2, resume=True)
    straight = checkpoint_io.read_checkpoint(tmp_path / "straight" / "checkpoint.pth")
    split = checkpoint_io.read_checkpoint(tmp_path / "split" / "checkpoint.pth")
    assert split["epoch"] == straight["epoch"] == 1
    for key in ("model", "model_ema"):
        assert straight[key].keys() == split[key].keys()
        for name, value in straight[key].items():
            assert torch.equal(value, split[key][name]), (key, name)
    assert straight["optimizer"]["state"].keys() == split["optimizer"]["state"].keys()
    states = zip(straight["optimizer"]["state"].values(), split["optimizer"]["state"].values())
    for state_a, state_b in states:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(state_a[name], state_b[name])
    assert straight["lr_scheduler"]["last_epoch"] == split["lr_scheduler"]["last_epoch"] == 2 * 3
    log = (tmp_path / "split" / "log.txt").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in log] == [0, 1]


def test_warmup_cosine_schedule():
    kw = dict(base_lr=1e-3, min_lr=1e-5, warmup_lr=1e-6, warmup_steps=4, total_steps=20)
    assert engine.warmup_cosine_lr(0, **kw) == pytest.approx(1e-6)
    assert engine.warmup_cosine_lr(2, **kw) == pytest.approx(1e-6 + (1e-3 - 1e-6) / 2)
    assert engine.warmup_cosine_lr(4, **kw) == pytest.approx(1e-3)
    assert engine.warmup_cosine_lr(12, **kw) == pytest.approx((1e-3 + 1e-5) / 2)  # half-way down
    assert engine.warmup_cosine_lr(20, **kw) == pytest.approx(1e-5)
    assert engine.warmup_cosine_lr(25, **kw) == pytest.approx(1e-5)
    # The scheduler follows it step by step, for every parameter group.
    model = vim_rpi.create_model("vim_tiny", depth=1, embed_dim=16, num_classes=2, img_size=16)
    optimizer = torch.optim.AdamW(engine.param_groups_weight_decay(model, 0.05), lr=kw["base_lr"])
    scheduler = engine.build_lr_scheduler(optimizer, **kw)
    for step in range(22):
        for group in optimizer.param_groups:
            assert group["lr"] == pytest.approx(engine.warmup_cosine_lr(step, **kw))
        optimizer.step()
        scheduler.step()


def test_no_weight_decay_groups():
    model = vim_rpi.create_model("vim_tiny", depth=1, embed_dim=16, num_classes=2, img_size=16)
    no_decay, decay = engine.param_groups_weight_decay(model, 0.05)
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.05
    names = {id(p): n for n, p in model.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert {"pos_embed", "cls_token", "head.bias", "norm_f.weight", "layers.0.mixer.D"} <= skipped
    assert {names[id(p)] for p in decay["params"]} == {
        n for n, p in model.named_parameters() if p.ndim > 1 and n not in ("pos_embed", "cls_token")}


def test_builtin_augmentation():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (36, 50, 3), dtype=np.uint8))
    crop = folder_dataset.RandomResizedCropFlip(24)
    torch.manual_seed(0)
    for _ in range(200):
        left, top, w, h = crop.crop_box(50, 36)
        assert 0 <= left and left + w <= 50 and 0 <= top and top + h <= 36
        assert 3 / 4 - 0.1 <= w / h <= 4 / 3 + 0.1
    assert crop(image).shape == (3, 24, 24)
    # A whole-image "crop" without flip is just the normalization the eval transform ends with:
    # a 27 x 27 image (27 = int(24 / 0.875)) is only center-cropped there, from round(1.5) = 2.
    square = Image.fromarray(rng.integers(0, 256, (27, 27, 3), dtype=np.uint8))
    whole = folder_dataset.RandomResizedCropFlip(27, scale=(1, 1), ratio=(1, 1), flip_prob=0)
    expected = image_preprocess.eval_transform(square, 24)
    assert torch.equal(whole(square)[:, 2:26, 2:26], expected)
    mirrored = folder_dataset.RandomResizedCropFlip(27, scale=(1, 1), ratio=(1, 1), flip_prob=1)
    assert torch.equal(mirrored(square), whole(square).flip(-1))


@pytest.mark.parametrize("case, code, message", [
    ("resume other classes", 2, "has 5 classes but the dataset 3"),
    ("resume weights only", 3, "not a training checkpoint"),
    ("val without train", 4, "has val/ but no train/"),
    ("nothing to start from", 2, "nothing to start from"),
    ("diverges", 1, "the training loss became nan"),
    ("output dir is a file", 2, "is not a directory"),
    ("checkpoint path is a directory", 2, "checkpoint.pth is a directory"),
    ("output dir cannot be made", 2, "cannot create --output-dir"),
    ("checkpoint cannot be written", 1, "cannot write to --output-dir"),
    ("image over the budget", 4, "over the 0.001 MB budget per image"),
    ("data path name too long", 4, "name too long"),
])
def test_training_bad_inputs(tmp_path, setup, capsys, monkeypatch, case, code, message):
    args = ["--finetune", str(setup["init"]), "--data-path", str(setup["data"]), "--epochs", "1",
            "--threads", "1", "-q"]
    if case == "resume other classes":
        args[0] = "--resume"
    elif case == "resume weights only":
        model, _ = factory.load_model(setup["init"])
        model.reset_classifier(3)
        checkpoint_io.save_weights(tmp_path / "w.pth", model.state_dict(), model_name="vim_tiny",
                                   model_args={"depth": 2, "embed_dim": 32, "img_size": 32})
        args[:2] = ["--resume", str(tmp_path / "w.pth")]
    elif case == "val without train":
        (tmp_path / "val" / "a").mkdir(parents=True)
        args[3] = str(tmp_path)
    elif case == "nothing to start from":
        args = args[2:]
    elif case == "diverges":
        args += ["--lr", "1e6", "--batch-size", "8"]
    elif case == "output dir is a file":
        (tmp_path / "out").write_text("")
        args += ["--output-dir", str(tmp_path / "out")]
    elif case == "checkpoint path is a directory":
        (tmp_path / "out" / "checkpoint.pth").mkdir(parents=True)
        args += ["--output-dir", str(tmp_path / "out")]
    elif case == "output dir cannot be made":
        (tmp_path / "file").write_text("")
        args += ["--output-dir", str(tmp_path / "file" / "out")]
    elif case == "data path name too long":
        args[3] = str(tmp_path / ("x" * 300))
    elif case == "image over the budget":  # a 36x36 PNG needs about 0.005 MB; training honours the budget too
        args += ["--max-image-mb", "0.001"]
    elif case == "checkpoint cannot be written":  # e.g. the disk filled up during the epoch
        monkeypatch.setattr(checkpoint_io.torch, "save", _failing_save)
        args += ["--output-dir", str(tmp_path / "out")]
    try:
        status = main.main(args)
    except SystemExit as exit_:
        status = exit_.code
    err = capsys.readouterr().err
    assert status == code
    assert message in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if "error" in line]) == 1


def _failing_save(obj, path):
    raise RuntimeError("[enforce fail at inline_container.cc] PytorchStreamWriter failed writing file")


def test_resumed_run_keeps_the_earlier_best_accuracy(tmp_path):
    log = tmp_path / "log.txt"
    records = [{"epoch": 0, "eval": {"acc1": 40.0}}, {"epoch": 1, "eval": {"acc1": 75.0}},
               {"epoch": 2, "eval": None}, {"epoch": 3, "eval": {"acc1": 90.0}}]
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main._previous_best_acc1(tmp_path, start_epoch=3) == 75.0  # epoch 3 is being redone
    assert main._previous_best_acc1(tmp_path, start_epoch=0) == -1.0
    assert main._previous_best_acc1(tmp_path / "empty", start_epoch=2) == -1.0
    assert main._previous_best_acc1(None, start_epoch=2) == -1.0
    with log.open("a") as f:  # damaged lines (an editor, a crash mid-write) are skipped
        f.write('{"epoch": 1, "eval": {"acc1": 80.0}}\nnot json\n{"epoch": 0}\n[1, 2]\n{"eval": {"acc1": "x"}}\n')
    assert main._previous_best_acc1(tmp_path, start_epoch=3) == 80.0

