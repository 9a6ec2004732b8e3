"""Classify images with a Vim model that stays loaded: the one API every front end uses.

    from vim_rpi import Classifier

    clf = Classifier()                      # released Vim-Tiny weights, fetched once
    result = clf.classify("cat.jpg")        # also bytes, a PIL image or an RGB uint8 array
    print(result.topk[0]["label"], result.topk[0]["prob"])

What to load and how is a `ClassifierConfig`, validated once when it is made (the front ends
build theirs from their options, the server's settings hold one). A Classifier owns loading
(checkpoint, quantization, device, the model's kernels), preprocessing with the model's data
config (input size, crop_pct, mean, std, the memory budget per image), a warm-up forward and
batched top-k with label names and timings. It changes nothing outside itself (threads, malloc
thresholds) unless asked to with `tune_process=True`, never prints, exits or writes os.environ;
every problem a user can cause is a `vim_rpi.errors.VimError` whose message says what to do.
"""

import dataclasses
import os
import time
from typing import Optional, Union

import torch

import mamba_ssm
from mamba_ssm.modules.mamba_simple import build_inference_constants
from vim_rpi import factory, image_budget, image_preprocess, imagenet_labels, quantization, registry, runtime
from vim_rpi.errors import ConfigError, option

__all__ = ["Classifier", "ClassifierConfig", "Prediction", "check_topk"]


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    """What a Classifier loads and how it runs. Every field is checked when the config is made
    (a ConfigError naming the field), so a front end refuses a bad option before anything slow.

    Args:
        checkpoint: a local file, an http(s) URL, a Hub file "hf-hub:OWNER/REPO/FILE", or None for
            the released weights of `model` (fetched from the Hugging Face Hub).
        model: registered name or alias; None means what the checkpoint holds (Vim-Tiny when no
            checkpoint is given either).
        threads: torch's intra-op threads. Process-wide, so applied only by a Classifier made with
            tune_process=True (or by `runtime.tune_process`); None leaves torch's setting.
        quantize: "none" or "dynamic-int8" (int8 weights for the Linear layers; CPU only).
        input_size: image side to run at (>= 16; None: the checkpoint's).
        exact_preprocess: decode JPEGs at full size (the official pixels) instead of the faster
            reduced-scale decode.
        max_image_mb: the most memory (MB of 2**20 bytes) preprocessing one image may take, worked
            out from its header before decoding (`vim_rpi.image_budget`); a larger image raises
            ImageTooLargeError.
        backend: kernel backend ("auto", "ref", "torch", "numba", "cuda"; see
            `mamba_ssm.set_backend`): the model's kernels, chosen once at load.
        device: "cpu", or "cuda" where a CUDA build of torch finds a GPU.
        ema: use a training checkpoint's EMA weights.
        trust_checkpoint: allow a checkpoint to unpickle arbitrary objects (can run code).
    """

    checkpoint: Optional[Union[str, os.PathLike]] = None
    model: Optional[str] = None
    threads: Optional[int] = None
    quantize: str = "none"
    input_size: Optional[int] = None
    exact_preprocess: bool = False
    max_image_mb: float = image_budget.DEFAULT_MAX_IMAGE_MB
    backend: str = "auto"
    device: str = "cpu"
    ema: bool = False
    trust_checkpoint: bool = False

    def __post_init__(self):
        if self.checkpoint is not None and not isinstance(self.checkpoint, (str, os.PathLike)):
            _refuse("checkpoint", f"must be a path, URL or hf-hub: reference, got {self.checkpoint!r}")
        if self.model is not None:
            try:
                registry.resolve_model_name(self.model)
            except ValueError as error:
                raise ConfigError(str(error), "model") from None
        if self.threads is not None:
            runtime.check_threads(self.threads)
        if self.quantize not in quantization.QUANTIZE_MODES:
            _refuse("quantize", f"must be one of {', '.join(quantization.QUANTIZE_MODES)}, got {self.quantize!r}")
        if self.input_size is not None and not (_is_int(self.input_size) and self.input_size >= 16):
            _refuse("input_size", f"must be an integer >= 16 pixels, got {self.input_size!r}")
        for flag in ("exact_preprocess", "ema", "trust_checkpoint"):
            if not isinstance(getattr(self, flag), bool):
                _refuse(flag, f"must be True or False, got {getattr(self, flag)!r}")
        try:
            image_budget.check_max_image_mb(self.max_image_mb, option("max_image_mb"))
        except ValueError as error:
            raise ConfigError(error.args[0], "max_image_mb") from None
        device = runtime.check_device(self.device)
        if device.type == "cuda" and self.quantize != "none":
            _refuse("quantize", f"dynamic-int8 runs on the CPU only; drop it or use {option('device')} cpu")
        runtime.check_backend(self.backend, device)


def _refuse(field, problem):
    raise ConfigError(f"{option(field)} {problem}", field)


def check_topk(k, num_classes=None):
    """`k` if it is a valid top-k (an integer >= 1, at most `num_classes` when that is known;
    None: 5, or every class of a smaller head), else a ConfigError about `topk`."""
    if k is None:
        return 5 if num_classes is None else min(5, num_classes)
    if not (_is_int(k) and k >= 1):
        _refuse("topk", f"must be an integer >= 1, got {k!r}")
    if num_classes is not None and k > num_classes:
        _refuse("topk", f"must be at most the model's {num_classes} classes, got {k}")
    return k


@dataclasses.dataclass
class Prediction:
    """The top-k of one image: topk [{"index", "label", "prob"}], best first; timing_ms
    {"preprocess", "inference"} (inference: the whole batched forward it was part of; a server
    adds "queue")."""

    topk: list
    timing_ms: dict


def _ms_since(start):
    return (time.perf_counter() - start) * 1e3


def class_names(num_classes):
    """ImageNet's names for a 1000-class head, else "class i"."""
    if num_classes == imagenet_labels.NUM_CLASSES:
        return imagenet_labels.imagenet_labels()
    return [f"class {i}" for i in range(num_classes)]


class Classifier:
    """A loaded Vim model plus its preprocessing.

    Classifier(checkpoint, model, **fields) makes its ClassifierConfig from the fields (see there);
    Classifier(config=config) takes a ready one.

    Args (besides the config's fields):
        config: a ClassifierConfig, instead of the fields.
        tune_process: tune this whole process for inference first (`runtime.tune_process`:
            the config's thread count, glibc's malloc thresholds). The front ends ask for it; a
            library caller decides.
        progress: show a download progress bar on stderr.
        warmup: run one forward now, so the first real request is not the slow one.
    Raises:
        ConfigError: an option that cannot work here; CheckpointError / DownloadError: the
        weights cannot be fetched or loaded.
    """

    def __init__(self, checkpoint=None, model=None, *, config=None, tune_process=False, progress=False, warmup=True,
                 **fields):
        if config is None:
            config = ClassifierConfig(checkpoint=checkpoint, model=model, **fields)
        elif checkpoint is not None or model is not None or fields:
            raise TypeError("give either config or its fields, not both")
        if config.threads is not None and not tune_process:
            _refuse("threads", "sets the whole process's torch threads: pass tune_process=True as well (or call "
                               "vim_rpi.tune_process)")
        self.config = config
        if tune_process:
            runtime.tune_process(config.threads)
        start = time.perf_counter()
        net, info = factory.load_model(config.checkpoint, config.model, ema=config.ema,
                                       trust_pickle=config.trust_checkpoint, input_size=config.input_size,
                                       progress=progress)
        self.device = torch.device(config.device)
        self.model = quantization.quantize_model(net, config.quantize).to(self.device)  # .to(): kernels for the device
        try:
            self.model.set_backend(config.backend)  # the kernels every forward runs, chosen now
        except RuntimeError as error:
            raise ConfigError(str(error), "backend") from None
        build_inference_constants(self.model)  # now, not in the first forward
        self.load_ms = _ms_since(start)
        self.model_name, self.checkpoint = info["model"], info["checkpoint"]
        self.num_classes, self.input_size = info["num_classes"], info["input_size"]
        cfg = registry.pretrained_cfg(self.model_name)
        self.data_config = {"input_size": self.input_size, "crop_pct": cfg["crop_pct"],
                            "interpolation": cfg["interpolation"], "mean": cfg["mean"], "std": cfg["std"]}
        # any image `preprocess` takes -> (3, S, S); picklable, for DataLoader workers
        self.preprocessor = image_preprocess.preprocessor(cfg, self.input_size, exact=config.exact_preprocess,
                                                          max_image_mb=config.max_image_mb)
        self.labels = class_names(self.num_classes)
        if warmup:
            self.warmup()

    def warmup(self):
        """One forward on a blank image: the first call pays one-time costs (allocations, kernel
        compilation or cache loading)."""
        self.logits(torch.zeros(1, 3, self.input_size, self.input_size))

    def preprocess(self, image):
        """A path, encoded bytes, PIL image or RGB uint8 array (H, W, 3) -> float32 (3, S, S).
        Raises ImageTooLargeError (over max_image_mb) or another ImageError."""
        return self.preprocessor(image)

    def check_topk(self, k):
        """`k` if it is a valid top-k for this model (None: 5, or every class of a smaller head),
        else a ConfigError."""
        return check_topk(k, self.num_classes)

    def logits(self, batch):
        """batch (B, 3, S, S) -> logits (B, num_classes), float32 on the CPU."""
        with torch.inference_mode():
            return self.model(batch.to(self.device)).float().cpu()

    def predict(self, batch, topk=None, preprocess_ms=None):
        """One forward for a preprocessed batch (B, 3, S, S): a Prediction per row.

        topk: one k for every row, or a list of B (each checked as `check_topk`).
        preprocess_ms: each row's preprocessing time, for its timing_ms (default 0).
        """
        rows = len(batch)
        ks = [self.check_topk(k) for k in (topk if isinstance(topk, (list, tuple)) else [topk] * rows)]
        if len(ks) != rows:
            raise ValueError(f"topk has {len(ks)} entries for a batch of {rows}")
        return self._predict(batch, ks, preprocess_ms or [0.0] * rows)

    def _predict(self, batch, ks, preprocess_ms):
        """`predict` with each row's k already checked."""
        start = time.perf_counter()
        probs = torch.softmax(self.logits(batch), dim=-1)  # (B, num_classes)
        inference_ms = _ms_since(start)
        top = probs.topk(max(ks), dim=-1)
        return [Prediction(topk=[{"index": i, "label": self.labels[i], "prob": p}
                                 for p, i in zip(values[:k], indices[:k])],
                           timing_ms={"preprocess": ms, "inference": inference_ms})
                for values, indices, k, ms in zip(top.values.tolist(), top.indices.tolist(), ks, preprocess_ms)]

    def classify_batch(self, images, topk=None):
        """Preprocess each image and classify them all in one forward: a list of Prediction.
        Raises ImageError for the first image that cannot be used."""
        k = self.check_topk(topk)
        tensors, preprocess_ms = [], []
        for image in images:
            start = time.perf_counter()
            tensors.append(self.preprocess(image))
            preprocess_ms.append(_ms_since(start))
        if not tensors:
            return []
        return self._predict(torch.stack(tensors), [k] * len(tensors), preprocess_ms)

    def classify(self, image, topk=None):
        """The Prediction for one image (see `classify_batch`)."""
        return self.classify_batch([image], topk)[0]

    def info(self):
        """What runs: model, checkpoint, classes, input size, threads, quantize, the memory budget
        per image, torch version, backends, load time."""
        return {"model": self.model_name, "checkpoint": self.checkpoint, "num_classes": self.num_classes,
                "input_size": self.input_size, "threads": torch.get_num_threads(), "quantize": self.config.quantize,
                "max_image_mb": self.config.max_image_mb, "device": str(self.device), "torch": torch.__version__,
                "backend": self.backend_report(), "load_ms": self.load_ms}

    def backend_report(self):
        """Which kernels this classifier's forwards run: the model's (`mamba_ssm.kernel_report`)."""
        return mamba_ssm.kernel_report(self.model)
