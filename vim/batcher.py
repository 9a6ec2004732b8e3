"""One thread owns the model; requests wait in a bounded queue and run as batched forwards.

    batcher = Batcher(lambda: Classifier("ckpt.pth"), queue_size=16, max_batch=8)
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
- Decoding and resizing (Pillow, which releases the GIL) run in a second thread, so the next
  images are prepared while the model computes, and an image that cannot be decoded never
  reaches the model's queue.
- Admission is bounded: at most `queue_size` requests may wait (being decoded or queued for the
  model); beyond that `submit` raises QueueFull at once, so overload turns into quick refusals
  instead of a growing backlog.
It imports no web framework: `submit` returns a `concurrent.futures.Future`; cancelling it (its
client went away) drops the request if its forward has not started.
"""

import collections
import concurrent.futures
import dataclasses
import logging
import threading
import time

import torch

from vim_rpi.classifier import Prediction

__all__ = ["Batcher", "QueueFull", "NotReady", "ShuttingDown"]

_log = logging.getLogger(__name__)


class QueueFull(Exception):
    """Too many requests are already waiting; try again shortly."""


class NotReady(Exception):
    """The model is still loading (or failed to load)."""


class ShuttingDown(Exception):
    """The batcher no longer accepts work."""


@dataclasses.dataclass
class _Job:
    """One request on its way through the batcher."""

    data: bytes
    topk: int
    future: concurrent.futures.Future
    submitted: float  # perf_counter() at submit
    tensor: torch.Tensor = None  # (3, S, S) once preprocessed
    preprocess_ms: float = 0.0


class Batcher:
    """Owns a Classifier in one worker thread and serves `submit` calls from any thread.

    Args:
        load: called once in the worker thread; returns the (warmed-up) Classifier.
        queue_size: most requests that may wait at once (being decoded or queued for the model).
        max_batch: most requests run together in one forward.
        on_load_error: called with the exception if `load` raises (e.g. to stop the server).
    """

    def __init__(self, load, *, queue_size=16, max_batch=8, on_load_error=None):
        if queue_size < 1 or max_batch < 1:
            raise ValueError(f"queue_size and max_batch must be >= 1, got {queue_size}, {max_batch}")
        self.queue_size, self.max_batch = queue_size, max_batch
        self.classifier = None
        self.load_error = None
        self._load, self._on_load_error = load, on_load_error
        self._lock = threading.Condition()
        self._ready = False
        self._closing = False
        self._waiting = 0  # admitted, not yet in a forward
        self._model_queue = collections.deque()  # preprocessed jobs, oldest first
        self._decoder = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="vim-decode")
        self._worker = threading.Thread(target=self._run, name="vim-model", daemon=True)

    def start(self):
        """Start the worker thread: it loads the model, then serves the queue."""
        self._worker.start()

    @property
    def ready(self):
        """True once the model is loaded and warmed up, until close()."""
        return self._ready and not self._closing

    @property
    def waiting(self):
        """Requests admitted and not yet in a forward."""
        return self._waiting

    def submit(self, data, topk):
        """Queue encoded image bytes for classification; returns a Future of a Prediction.

        The future raises ImageError (the bytes are not a usable image) or, for a failed forward,
        RuntimeError; cancel it to drop the request before its forward. `topk` must already be valid for the model (Classifier.check_topk).
        Raises NotReady, ShuttingDown or QueueFull at once instead of queueing.
        """
        with self._lock:
            if self._closing:
                raise ShuttingDown("the server is shutting down")
            if not self._ready:
                raise NotReady("the model is still loading" if self.load_error is None
                               else f"the model failed to load: {self.load_error}")
            if self._waiting >= self.queue_size:
                raise QueueFull(f"{self._waiting} requests are already waiting")
            self._waiting += 1
            job = _Job(data, topk, concurrent.futures.Future(), time.perf_counter())
            # under the lock: close() cannot shut the decoder down between the checks and this
            self._decoder.submit(self._preprocess, job)
        return job.future

    def close(self, grace_s=10.0):
        """Refuse new work, let queued requests finish (at most `grace_s` seconds), stop the
        worker. Requests still waiting after that fail with ShuttingDown."""
        with self._lock:
            self._closing = True
            self._lock.notify_all()
        self._decoder.shutdown(wait=True)
        self._worker.join(grace_s if self._worker.is_alive() else 0)
        with self._lock:
            leftover = list(self._model_queue)
            self._model_queue.clear()
            self._waiting -= len(leftover)
        for job in leftover:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(ShuttingDown("the server shut down before this request ran"))

    def _preprocess(self, job):
        """Decoder thread: bytes -> tensor, then hand the job to the worker (or fail it)."""
        if job.future.cancelled():  # its client is gone
            self._release(1)
            return
        start = time.perf_counter()
        try:
            job.tensor = self.classifier.preprocess(job.data)
        except Exception as error:  # ImageError, or anything unforeseen: the request fails, its slot frees
            self._release(1)
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(error)
            return
        finally:
            job.data = None  # the encoded bytes are not needed any more
            job.preprocess_ms = (time.perf_counter() - start) * 1e3
        with self._lock:
            self._model_queue.append(job)
            self._lock.notify()

    def _release(self, count):
        with self._lock:
            self._waiting -= count
            self._lock.notify_all()  # a closing worker may be waiting for the count to reach 0

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
                while not self._model_queue and not (self._closing and self._waiting == 0):
                    self._lock.wait()
                if not self._model_queue:
                    return
                batch = [self._model_queue.popleft() for _ in range(min(self.max_batch, len(self._model_queue)))]
                self._waiting -= len(batch)
            # A cancelled future (its request was abandoned) never reaches the model.
            batch = [job for job in batch if job.future.set_running_or_notify_cancel()]
            if batch:
                self._forward(batch)

    def _forward(self, jobs):
        """One batched forward for `jobs`; each future gets its own Prediction."""
        started = time.perf_counter()
        try:
            results, inference_ms = self.classifier.predict(torch.stack([j.tensor for j in jobs]),
                                                            max(j.topk for j in jobs))
        except Exception as error:  # a failed forward fails its requests, not the worker
            _log.exception("batched forward of %d images failed", len(jobs))
            for job in jobs:
                job.future.set_exception(RuntimeError(f"inference failed: {type(error).__name__}"))
            return
        for job, topk in zip(jobs, results):
            queue_ms = (started - job.submitted) * 1e3 - job.preprocess_ms
            job.future.set_result(Prediction(topk=topk[:job.topk], timing_ms={
                "queue": max(queue_ms, 0.0), "preprocess": job.preprocess_ms, "inference": inference_ms}))
