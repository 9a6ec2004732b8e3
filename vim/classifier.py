"""Classify images with a Vim model that stays loaded: the one API every front end uses.

    from vim_rpi import Classifier

    clf = Classifier()                      # released Vim-Tiny weights, fetched once
    result = clf.classify("cat.jpg")        # also bytes, a PIL image or an RGB uint8 array
    print(result.topk[0]["label"], result.topk[0]["prob"])

A Classifier owns loading (checkpoint, quantization, device), process tuning (threads, malloc
thresholds), preprocessing with the model's data config (input size, crop_pct, mean, std), a
warm-up forward and batched top-k with label names and timings. It never prints, exits or writes
os.environ; every problem a user can cause is a `vim_rpi.errors.VimError` with a message.
"""

import dataclasses
import time

import torch

import mamba_ssm
from mamba_ssm.modules.mamba_simple import build_inference_constants
from vim_rpi import factory, image_budget, image_preprocess, imagenet_labels, quantization, registry, runtime
from vim_rpi.errors import ConfigError

__all__ = ["Classifier", "Prediction"]


@dataclasses.dataclass
class Prediction:
    """The top-k of one image: topk [{"index", "label", "prob"}], best first; timing_ms
    {"preprocess", "inference"} (inference: the whole batched forward it was part of)."""

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

    Args:
        checkpoint: a local file, an http(s) URL, a Hub file "hf-hub:OWNER/REPO/FILE", or None for
            the released weights of `model` (fetched from the Hugging Face Hub).
        model: registered name or alias; None means what the checkpoint holds (Vim-Tiny when no
            checkpoint is given either).
        threads: torch intra-op threads for this process (None: leave torch's setting).
        quantize: "none" or "dynamic-int8" (int8 weights for the Linear layers; CPU only).
        input_size: image side to run at (None: the checkpoint's).
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
        progress: show a download progress bar on stderr.
        tune_process: raise glibc's malloc thresholds (fewer page faults per forward).
        warmup: run one forward now, so the first real request is not the slow one.
    Raises:
        ConfigError: an option that cannot work here; CheckpointError / DownloadError: the
        weights cannot be fetched or loaded.
    """

    def __init__(self, checkpoint=None, model=None, *, threads=None, quantize="none", input_size=None,
                 exact_preprocess=False, max_image_mb=image_budget.DEFAULT_MAX_IMAGE_MB, backend="auto", device="cpu",
                 ema=False, trust_checkpoint=False, progress=False, tune_process=True, warmup=True):
        self.device = _check_options(model, threads, quantize, input_size, max_image_mb, backend, device)
        self.backend, self.quantize, self.exact_preprocess = backend, quantize, exact_preprocess
        self.max_image_mb = max_image_mb
        if tune_process:
            runtime.tune_malloc()
        if threads is not None:
            runtime.set_threads(threads)
        start = time.perf_counter()
        net, info = factory.load_model(checkpoint, model, ema=ema, trust_pickle=trust_checkpoint,
                                       input_size=input_size, progress=progress)
        self.model = quantization.quantize_model(net, quantize).to(self.device)  # .to(): kernels for the device
        try:
            self.model.set_backend(backend)  # the kernels every forward runs, chosen now
        except RuntimeError as error:
            raise ConfigError(str(error)) from None
        build_inference_constants(self.model)  # now, not in the first forward
        self.load_ms = _ms_since(start)
        self.model_name, self.checkpoint = info["model"], info["checkpoint"]
        self.num_classes, self.input_size = info["num_classes"], info["input_size"]
        cfg = registry.pretrained_cfg(self.model_name)
        self.data_config = {"input_size": self.input_size, "crop_pct": cfg["crop_pct"],
                            "interpolation": cfg["interpolation"], "mean": cfg["mean"], "std": cfg["std"]}
        self.transform = image_preprocess.transform_for(cfg, self.input_size)  # PIL image -> (3, S, S)
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
        cfg = self.data_config
        return image_preprocess.preprocess_image(image, self.input_size, exact=self.exact_preprocess,
                                                 crop_pct=cfg["crop_pct"], mean=cfg["mean"], std=cfg["std"],
                                                 max_image_mb=self.max_image_mb)

    def check_topk(self, k):
        """`k` if it is a valid top-k for this model (None: 5, or every class of a smaller head),
        else a ConfigError."""
        if k is None:
            return min(5, self.num_classes)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(f"--topk must be an integer >= 1, got {k!r}")
        if k > self.num_classes:
            raise ConfigError(f"--topk must be at most the model's {self.num_classes} classes, got {k}")
        return k

    def logits(self, batch):
        """batch (B, 3, S, S) -> logits (B, num_classes), float32 on the CPU."""
        with torch.inference_mode():
            return self.model(batch.to(self.device)).float().cpu()

    def predict(self, batch, topk=None):
        """Top-k of a preprocessed batch (B, 3, S, S) in one forward.
        Returns ([[{"index", "label", "prob"}] * topk] * B, inference_ms)."""
        k = self.check_topk(topk)
        start = time.perf_counter()
        probs = torch.softmax(self.logits(batch), dim=-1)  # (B, num_classes)
        inference_ms = _ms_since(start)
        top = probs.topk(k, dim=-1)
        results = [[{"index": i, "label": self.labels[i], "prob": p} for p, i in zip(values, indices)]
                   for values, indices in zip(top.values.tolist(), top.indices.tolist())]
        return results, inference_ms

    def classify_batch(self, images, topk=None):
        """Preprocess each image and classify them all in one forward: a list of Prediction.
        Raises ImageError for the first image that cannot be used."""
        self.check_topk(topk)
        tensors, preprocess_ms = [], []
        for image in images:
            start = time.perf_counter()
            tensors.append(self.preprocess(image))
            preprocess_ms.append(_ms_since(start))
        if not tensors:
            return []
        results, inference_ms = self.predict(torch.stack(tensors), topk)
        return [Prediction(topk=r, timing_ms={"preprocess": p, "inference": inference_ms})
                for r, p in zip(results, preprocess_ms)]

    def classify(self, image, topk=None):
        """The Prediction for one image (see `classify_batch`)."""
        return self.classify_batch([image], topk)[0]

    def info(self):
        """What runs: model, checkpoint, classes, input size, threads, quantize, the memory budget
        per image, torch version, backends, load time."""
        return {"model": self.model_name, "checkpoint": self.checkpoint, "num_classes": self.num_classes,
                "input_size": self.input_size, "threads": torch.get_num_threads(), "quantize": self.quantize,
                "max_image_mb": self.max_image_mb,
                "device": str(self.device), "torch": torch.__version__, "backend": self.backend_report(),
                "load_ms": self.load_ms}

    def backend_report(self):
        """Which kernels this classifier's forwards run: the model's (`mamba_ssm.kernel_report`)."""
        return mamba_ssm.kernel_report(self.model)


def _check_options(model, threads, quantize, input_size, max_image_mb, backend, device):
    """ConfigError for options that cannot work, before anything slow; returns the torch.device."""
    if model is not None:
        try:
            registry.resolve_model_name(model)
        except ValueError as error:
            raise ConfigError(str(error)) from None
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"--threads must be an integer >= 1, got {threads!r}")
    if quantize not in quantization.QUANTIZE_MODES:
        raise ConfigError(f"--quantize must be one of {', '.join(quantization.QUANTIZE_MODES)}, got {quantize!r}")
    if input_size is not None and (isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 16):
        raise ConfigError(f"--input-size must be an integer >= 16 pixels, got {input_size!r}")
    try:
        image_budget.check_max_image_mb(max_image_mb, "--max-image-mb")
    except ValueError as error:
        raise ConfigError(str(error)) from None
    device = runtime.check_device(device)
    if device.type == "cuda" and quantize != "none":
        raise ConfigError("--quantize dynamic-int8 runs on the CPU only; drop it or use --device cpu")
    runtime.check_backend(backend, device)
    return device
