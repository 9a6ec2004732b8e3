"""vim_rpi.batcher.Batcher in-process: requests that wait together run as one forward, the queue is
bounded, bad images fail alone, a slow decode holds up no one, every request's bytes are released
once, close() finishes queued work within its grace period, and load failures are reported."""

import io
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

import vim_rpi
from vim_rpi import Classifier, checkpoint_io
from vim_rpi.batcher import Batcher, NotReady, QueueFull, ShuttingDown
from vim_rpi.errors import CheckpointError, ImageError

TIMEOUT = 30


@pytest.fixture(scope="module")
def clf(tmp_path_factory, one_thread):
    torch.manual_seed(0)
    model = vim_rpi.create_model("vim_tiny", depth=2, embed_dim=64, img_size=64, num_classes=10)
    torch.nn.init.normal_(model.head.weight, std=1.0)
    path = tmp_path_factory.mktemp("ckpt") / "small.pth"
    checkpoint_io.save_checkpoint(path, model)
    return Classifier(path, threads=1)


def _png(seed):
    pixels = np.random.default_rng(seed).integers(0, 256, (48, 60, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


class GatedClassifier:
    """Wraps a Classifier: the first forward waits for `gate`, and batch sizes are recorded."""

    def __init__(self, clf):
        self.clf, self.gate, self.batches, self.started = clf, threading.Event(), [], threading.Event()

    def __getattr__(self, name):
        return getattr(self.clf, name)

    def predict(self, batch, topk=5):
        self.batches.append(len(batch))
        self.started.set()
        assert self.gate.wait(TIMEOUT)
        return self.clf.predict(batch, topk)


def _until(condition):
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def _ready(batcher):
    batcher.start()
    _until(lambda: batcher.ready)
    return batcher


def test_waiting_requests_run_as_one_forward_with_the_classifiers_results(clf):
    gated = GatedClassifier(clf)
    batcher = _ready(Batcher(lambda: gated, queue_size=8, max_batch=4))
    images = [_png(i) for i in range(6)]
    first = batcher.submit(images[0], 3)
    assert gated.started.wait(TIMEOUT)  # the worker is busy with the first image alone
    rest = [batcher.submit(image, k) for image, k in zip(images[1:], (1, 2, 3, 4, 5))]
    _until(lambda: len(batcher._model_queue) == 5)  # all decoded and waiting for the model
    gated.gate.set()
    results = [f.result(TIMEOUT) for f in [first, *rest]]
    assert gated.batches == [1, 4, 1]  # then at most max_batch at a time
    for image, k, result in zip(images, (3, 1, 2, 3, 4, 5), results):
        want = clf.classify(image, topk=k).topk
        assert [e["index"] for e in result.topk] == [e["index"] for e in want]
        assert [e["prob"] for e in result.topk] == pytest.approx([e["prob"] for e in want], abs=1e-5)
        assert set(result.timing_ms) == {"queue", "preprocess", "inference"}
        assert min(result.timing_ms.values()) >= 0
    batcher.close()


def test_a_full_queue_refuses_at_once_and_bad_images_fail_alone(clf):
    gated = GatedClassifier(clf)
    batcher = _ready(Batcher(lambda: gated, queue_size=2, max_batch=8))
    running = batcher.submit(_png(0), 5)
    assert gated.started.wait(TIMEOUT)
    waiting = [batcher.submit(b"not an image", 5), batcher.submit(_png(1), 5)]
    with pytest.raises(QueueFull):
        batcher.submit(_png(2), 5)
    gated.gate.set()
    assert running.result(TIMEOUT).topk and waiting[1].result(TIMEOUT).topk
    with pytest.raises(ImageError, match="not an image"):
        waiting[0].result(TIMEOUT)
    assert batcher.submit(_png(3), 5).result(TIMEOUT).topk  # room again
    batcher.close()


def test_a_cancelled_request_never_reaches_the_model(clf):
    gated = GatedClassifier(clf)
    batcher = _ready(Batcher(lambda: gated, queue_size=4, max_batch=4))
    running = batcher.submit(_png(0), 5)
    assert gated.started.wait(TIMEOUT)
    abandoned, kept = batcher.submit(_png(1), 5), batcher.submit(_png(2), 5)
    assert abandoned.cancel()  # its client went away while it waited
    gated.gate.set()
    assert running.result(TIMEOUT).topk and kept.result(TIMEOUT).topk
    assert gated.batches == [1, 1] and batcher.waiting == 0
    batcher.close()


def test_close_finishes_queued_work_then_refuses(clf):
    gated = GatedClassifier(clf)
    batcher = _ready(Batcher(lambda: gated, queue_size=4, max_batch=1))
    futures = [batcher.submit(_png(i), 5) for i in range(3)]
    assert gated.started.wait(TIMEOUT)
    closer = threading.Thread(target=batcher.close, args=(TIMEOUT,))
    closer.start()
    gated.gate.set()
    closer.join(TIMEOUT)
    assert not closer.is_alive()
    assert all(f.result(0).topk for f in futures)
    assert not batcher.ready
    with pytest.raises(ShuttingDown):
        batcher.submit(_png(0), 5)


def test_load_errors_are_reported_and_requests_refused():
    reported = []

    def load():
        raise CheckpointError("checkpoint not found: x.pth")

    batcher = Batcher(load, on_load_error=reported.append)
    with pytest.raises(NotReady, match="loading"):
        batcher.submit(b"", 5)
    batcher.start()
    batcher.close(TIMEOUT)
    assert [str(e) for e in reported] == ["checkpoint not found: x.pth"]
    with pytest.raises(ShuttingDown):
        batcher.submit(b"", 5)


@pytest.mark.parametrize("size", ["queue_size", "max_batch", "decoders"])
def test_sizes_must_be_positive(size):
    with pytest.raises(ValueError, match="must be >= 1"):
        Batcher(lambda: None, **{size: 0})


class SlowDecodeClassifier:
    """Wraps a Classifier: decoding the bytes in `slow` waits for `gate` (a large image's decode)."""

    def __init__(self, clf, slow):
        self.clf, self.slow, self.gate, self.decoding = clf, slow, threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self.clf, name)

    def preprocess(self, data):
        if data == self.slow:
            self.decoding.set()
            assert self.gate.wait(TIMEOUT)
        return self.clf.preprocess(data)


def test_a_slow_decode_does_not_hold_up_the_images_behind_it(clf):
    big, small = _png(10), _png(11)
    slow = SlowDecodeClassifier(clf, big)
    batcher = _ready(Batcher(lambda: slow, queue_size=4, decoders=2))
    stuck = batcher.submit(big, 5)
    assert slow.decoding.wait(TIMEOUT)
    assert batcher.submit(small, 5).result(TIMEOUT).topk  # answered while the big one still decodes
    assert not stuck.done()
    slow.gate.set()
    assert stuck.result(TIMEOUT).topk
    batcher.close()


def test_each_submit_releases_its_bytes_once_on_every_path(clf):
    """Success, a bad image, a cancelled request, and requests dropped at shutdown (queued and
    being decoded): on_release runs once for each, and the queue count returns to 0."""
    big = _png(20)
    slow = SlowDecodeClassifier(clf, big)
    batcher = _ready(Batcher(lambda: slow, queue_size=8, decoders=1))
    released = []
    done = batcher.submit(_png(0), 5, on_release=lambda: released.append("good"))
    bad = batcher.submit(b"not an image", 5, on_release=lambda: released.append("bad"))
    assert done.result(TIMEOUT).topk
    with pytest.raises(ImageError):
        bad.result(TIMEOUT)
    decoding = batcher.submit(big, 5, on_release=lambda: released.append("decoding"))
    assert slow.decoding.wait(TIMEOUT)
    queued = batcher.submit(_png(1), 5, on_release=lambda: released.append("queued"))
    cancelled = batcher.submit(_png(2), 5, on_release=lambda: released.append("cancelled"))
    assert cancelled.cancel()
    batcher.close(grace_s=0.2)  # the big decode still runs: everything left fails
    for future in (decoding, queued):
        with pytest.raises(ShuttingDown):
            future.result(0)
    assert sorted(released) == ["bad", "cancelled", "good", "queued"] and batcher.waiting == 0
    slow.gate.set()
    _until(lambda: len(released) == 5)
    assert sorted(released) == ["bad", "cancelled", "decoding", "good", "queued"]


def test_close_fails_a_forward_that_outlasts_the_grace_period(clf):
    gated = GatedClassifier(clf)
    batcher = _ready(Batcher(lambda: gated, queue_size=4, max_batch=1))
    running = batcher.submit(_png(0), 5)
    assert gated.started.wait(TIMEOUT)
    waiting = batcher.submit(_png(1), 5)
    start = time.monotonic()
    batcher.close(grace_s=0.2)
    assert time.monotonic() - start < TIMEOUT
    for future in (running, waiting):
        with pytest.raises(ShuttingDown, match="shut down before"):
            future.result(0)
    gated.gate.set()  # the forward ends later: its result goes nowhere, the worker stops
    _until(lambda: not batcher._threads[0].is_alive())
    assert running.exception(0) is not None
