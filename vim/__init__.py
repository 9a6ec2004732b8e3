"""Vision Mamba (Vim) image classification on the CPU, built for the Raspberry Pi.

    from vim_rpi import Classifier
    print(Classifier().classify("cat.jpg").topk[0])

Layers, each importing only those below it (tests/test_layering.py checks this):
  errors, registry, imagenet_labels, progress          plain data and helpers (no torch)
  vision_mamba, hub, image_preprocess,                 the model (builds only), weight fetching (Hub,
  quantization, runtime                                URLs), preprocessing, tuning
  checkpoint_io                                        reading and writing checkpoints
  factory                                              create_model / load_model
  classifier, folder_dataset, engine                   the Classifier API; training and evaluation
  streams                                              video sources, the latest-frame loop, path streams
  cli, batcher                                         what the command-line front ends share; the
                                                       worker thread that batches requests for a server
  access, connections, uploads                         the HTTP server's Host/Origin/token checks,
                                                       connection limits (uvicorn) and upload reading
  infer_rpi, main, models_mamba, server                front ends, upstream's compatibility module, the
                                                       HTTP app (FastAPI: optional, imported only there)
  serve_rpi                                            the HTTP server's command line (uvicorn)
Names are loaded on first use, so `import vim_rpi` stays cheap.
"""

import importlib

__version__ = "0.2.0"

_EXPORTS = {
    "Classifier": "vim_rpi.classifier",
    "Prediction": "vim_rpi.classifier",
    "create_model": "vim_rpi.factory",
    "load_model": "vim_rpi.factory",
    "list_models": "vim_rpi.registry",
    "is_model": "vim_rpi.registry",
    "resolve_model_name": "vim_rpi.registry",
    "model_architecture": "vim_rpi.registry",
    "pretrained_cfg": "vim_rpi.registry",
    "VisionMamba": "vim_rpi.vision_mamba",
    "register_with_timm": "vim_rpi.models_mamba",
    "VimError": "vim_rpi.errors",
    "ConfigError": "vim_rpi.errors",
    "CheckpointError": "vim_rpi.errors",
    "DownloadError": "vim_rpi.errors",
    "ImageError": "vim_rpi.errors",
    "SourceError": "vim_rpi.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vim_rpi' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
