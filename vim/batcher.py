"""One thread owns the model; requests wait in a bounded queue and run as batched forwards.

    batcher = Batcher(lambda: Classifier("ckpt.pth"), queue_size=16, max_batch=8, decoders=2)
    batcher.start()                         # loads and warms the model in the worker thread
    future = batcher.submit(jpeg_bytes, topk=5)
    future.result()                         # -> Prediction (topk, timing_ms {queue, preprocess, inference})
    batcher.close(grace_s=10)               # refuse new work, finish what is queued

Why this shape (used by the HTTP server, `vim_rpi.server`, and usable by any other front end):
- A forward pass uses every core, so running two at once only makes both slower; one worker
  thread owns the Classifier and runs one forward at a time.
- Requests that arrive while a forward runs wait; the worker then takes all of them (up to
  `max_batch`) into one batched forward, which costs far less than one forward each. A request
  that finds the worker idle runs at once, alone: batching never waits for company.
- Decoding and resizing (Pillow, which releases the GIL) run in `decoders` threads of their own,
  so the next images are prepared while the model computes, one large image (seconds to decode)
  does not hold up the small ones behind it, and an image that cannot be decoded never reaches
  the model's queue. Decoded pixels in memory: at most `decoders` images at once, each within
  the Classifier's per-image budget.
- Admission is bounded: at most `queue_size` requests may wait (to be decoded, being decoded or
  queued for the model); beyond that `submit` raises QueueFull at once, so overload turns into
  quick refusals instead of a growing backlog.
It imports no web framework: `submit` returns a `concurrent.futures.Future`; cancelling it (its
client went away) drops the request if its forward has not started.
"""

import collections
import concurrent.futures
import contextlib
import dataclasses
import logging
import threading
import time
from typing import Callable, Optional

import torch

from vim_rpi.classifier import Prediction
from vim_rpi.errors import ImageError

__all__ = ["Batcher", "QueueFull", "NotReady", "ShuttingDown"]

_log = logging.getLogger(__name__)


class QueueFull(Exception):
    """Too many requests are already waiting; try again shortly."""


class NotReady(Exception):
    """The model is still loading (or failed to load)."""


class ShuttingDown(Exception):
    """The batcher no longer accepts work, or shut down before a request ran."""


@dataclasses.dataclass(eq=False)  # jobs are compared by identity (set membership)
class _Job:
    """One request on its way through the batcher."""

    data: Optional[bytes]
    topk: int
    future: concurrent.futures.Future
    submitted: float  # perf_counter() at submit
    on_release: Optional[Callable[[], None]]
    tensor: torch.Tensor = None  # (3, S, S) once preprocessed
    preprocess_ms: float = 0.0

    def release(self):
        """Drop the encoded bytes and tell the submitter, once."""
        callback, self.on_release, self.data = self.on_release, None, None
        if callback is not None:
            callback()


def _without_frames(error):
    """`error` without its traceback and the exceptions it was raised from: their frames hold
    the image's bytes (and whatever the decoder made of them) for as long as the error lives."""
    error.__cause__ = error.__context__ = None
    return error.with_traceback(None)


def _settle(future, result=None, error=None):
    """Complete `future` unless it already is: cancelled by its client, or failed at shutdown
    while its forward ran (whichever thread comes second does nothing)."""
    with contextlib.suppress(concurrent.futures.InvalidStateError, RuntimeError):
        if future.running() or future.set_running_or_notify_cancel():
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)


class Batcher:
    """Owns a Classifier in one worker thread and serves `submit` calls from any thread.

    Args:
        load: called once in the worker thread; returns the (warmed-up) Classifier.
        queue_size: most requests that may wait at once (to be decoded, being decoded, or queued
            for the model).
        max_batch: most requests run together in one forward.
        decoders: threads that decode images (bytes -> tensor) beside the model's thread.
        on_load_error: called with the exception if `load` raises (e.g. to stop the server).
    Raises ValueError if a size is below 1.
    """

    def __init__(self, load, *, queue_size=16, max_batch=8, decoders=2, on_load_error=None):
        if min(queue_size, max_batch, decoders) < 1:
            raise ValueError(f"queue_size, max_batch and decoders must be >= 1, got {queue_size}, {max_batch}, "
                             f"{decoders}")
        self.queue_size, self.max_batch, self.decoders = queue_size, max_batch, decoders
        self.classifier = None
        self.load_error = None
        self._load, self._on_load_error = load, on_load_error
        self._lock = threading.Condition()  # guards everything below; notified on every change
        self._ready = False
        self._closing = False  # no new work
        self._stopped = False  # close()'s grace is over: nothing more starts
        self._decode_queue = collections.deque()  # submitted jobs, oldest first
        self._decoding = set()  # jobs a decoder thread works on
        self._model_queue = collections.deque()  # preprocessed jobs, oldest first
        self._running = []  # the jobs of the forward that runs
        self._threads = [threading.Thread(target=self._run, name="vim-model", daemon=True)] + [
            threading.Thread(target=self._decode_loop, name=f"vim-decode-{i}", daemon=True) for i in range(decoders)]

    def start(self):
        """Start the threads: the worker loads the model, then serves the queue."""
        for thread in self._threads:
            thread.start()

    @property
    def ready(self):
        """True once the model is loaded and warmed up, until close()."""
        return self._ready and not self._closing

    @property
    def waiting(self):
        """Requests admitted and not yet in a forward."""
        return len(self._decode_queue) + len(self._decoding) + len(self._model_queue)

    def submit(self, data, topk, on_release=None):
        """Queue encoded image bytes for classification; returns a Future of a Prediction.

        The future raises ImageError (the bytes are not a usable image; ImageTooLargeError over
        the Classifier's memory budget), ShuttingDown (close() ran out of time before it), or
        RuntimeError for a failed forward; cancel it to drop the request before its forward.
        `topk` must already be valid for the model (Classifier.check_topk). `on_release` is called
        once, from any thread, when the batcher no longer holds `data` (after decoding, or when
        the request is dropped); not called when submit raises.
        Raises NotReady, ShuttingDown or QueueFull at once instead of queueing.
        """
        with self._lock:
            if self._closing:
                raise ShuttingDown("the server is shutting down")
            if not self._ready:
                raise NotReady("the model is still loading" if self.load_error is None
                               else f"the model failed to load: {self.load_error}")
            if self.waiting >= self.queue_size:
                raise QueueFull(f"{self.waiting} requests are already waiting")
            job = _Job(data, topk, concurrent.futures.Future(), time.perf_counter(), on_release)
            self._decode_queue.append(job)
            self._lock.notify_all()
        return job.future

    def close(self, grace_s=10.0):
        """Refuse new work, let queued requests finish (at most `grace_s` seconds), then fail
        the requests still waiting or running with ShuttingDown. Safe to call again."""
        deadline = time.monotonic() + grace_s
        with self._lock:
            self._closing = True
            self._lock.notify_all()
            while (self.waiting or self._running) and not self._stopped and time.monotonic() < deadline:
                self._lock.wait(deadline - time.monotonic())
            self._stopped = True
            queued = list(self._decode_queue)
            leftover = queued + list(self._decoding) + list(self._model_queue) + self._running
            self._decode_queue.clear()
            self._decoding.clear()  # a decoder still busy with one of these drops it when done
            self._model_queue.clear()
            self._running = []
            self._lock.notify_all()
        for job in queued:
            job.release()
        for job in leftover:
            _settle(job.future, error=ShuttingDown("the server shut down before this request ran"))
        for thread in self._threads:  # e.g. a model still loading: its outcome is reported (within the grace)
            if thread.is_alive():
                thread.join(max(deadline - time.monotonic(), 0))

    def join(self):
        """After close(): wait until the threads have finished what they were running (a forward
        or a decode whose request was already failed). A process must not exit while torch
        computes in one of them."""
        for thread in self._threads:
            if thread.is_alive():
                thread.join()

    def _decode_loop(self):
        """Decoder thread: take the oldest submitted job, bytes -> tensor, hand it to the worker."""
        while True:
            with self._lock:
                while not self._decode_queue and not self._closing:
                    self._lock.wait()
                if self._stopped or not self._decode_queue:  # closing drains the queue first
                    return
                job = self._decode_queue.popleft()
                self._decoding.add(job)
            self._preprocess(job)

    def _preprocess(self, job):
        """bytes -> tensor; the job then joins the model's queue, or fails alone."""
        error = None
        if job.future.cancelled():  # its client is gone
            error = concurrent.futures.CancelledError()
        else:
            start = time.perf_counter()
            try:
                job.tensor = self.classifier.preprocess(job.data)
            except ImageError as failure:  # the client's image: the message is all that is needed
                error = _without_frames(failure)
            except Exception as failure:  # anything unforeseen: this request fails alone
                error = failure
            job.preprocess_ms = (time.perf_counter() - start) * 1e3
        job.release()
        with self._lock:
            if job not in self._decoding:  # close() gave up on it meanwhile
                return
            self._decoding.discard(job)
            if error is None:
                self._model_queue.append(job)
            self._lock.notify_all()
        if error is not None:
            _settle(job.future, error=error)
            del error  # no cycle from this frame through the traceback to the exception

    def _run(self):
        """Worker thread: load the model, then run batches until closed and drained."""
        start = time.perf_counter()
        try:
            self.classifier = self._load()
        except Exception as error:  # reported to the owner, who decides how to stop
            self.load_error = error
            _log.error("loading the model failed: %s", error)
            if self._on_load_error is not None:
                self._on_load_error(error)
            return
        with self._lock:
            self._ready = True
        _log.info("ready: %s loaded and warmed up in %.1f s", self.classifier.model_name, time.perf_counter() - start)
        while True:
            with self._lock:
                while not self._model_queue and not self._stopped and not (self._closing and not self.waiting):
                    self._lock.wait()
                if self._stopped or not self._model_queue:
                    return
                batch = [self._model_queue.popleft() for _ in range(min(self.max_batch, len(self._model_queue)))]
                # A cancelled future (its request was abandoned) never reaches the model.
                self._running = [job for job in batch if job.future.set_running_or_notify_cancel()]
                batch = self._running
                self._lock.notify_all()
            if batch:
                self._forward(batch)
            with self._lock:
                self._running = []
                self._lock.notify_all()

    def _forward(self, jobs):
        """One batched forward for `jobs`; each future gets its own Prediction."""
        started = time.perf_counter()
        try:
            results, inference_ms = self.classifier.predict(torch.stack([j.tensor for j in jobs]),
                                                            max(j.topk for j in jobs))
        except Exception as error:  # a failed forward fails its requests, not the worker
            _log.exception("batched forward of %d images failed", len(jobs))
            for job in jobs:
                _settle(job.future, error=RuntimeError(f"inference failed: {type(error).__name__}"))
            return
        for job, topk in zip(jobs, results):
            queue_ms = (started - job.submitted) * 1e3 - job.preprocess_ms
            _settle(job.future, Prediction(topk=topk[:job.topk], timing_ms={
                "queue": max(queue_ms, 0.0), "preprocess": job.preprocess_ms, "inference": inference_ms}))
