"""What the command-line front ends share: model options, exit codes, the error-to-exit-code
convention, logging and stdout set-up.

Exit codes: 0 success, 1 failed (training), 2 usage error (argparse's), 3 checkpoint could not be
fetched or loaded, 4 input data failed (some images, the dataset, or a video source), 130
interrupted (a stream that Ctrl-C ends is not: infer_rpi.py treats it as the end of its input).
Predictable problems end with one line on stderr, never a traceback; a closed stdout (| head)
ends a front end quietly with status 0.
"""

import dataclasses
import logging
import os
import sys

from causal_conv1d import backends
from vim_rpi import image_budget
from vim_rpi.classifier import ClassifierConfig
from vim_rpi.errors import (CheckpointError, ConfigError, DatasetError, DownloadError, ImageError, SampleError,
                            SourceError, TrainingError, VimError)

__all__ = ["EXIT_OK", "EXIT_FAILED", "EXIT_USAGE", "EXIT_CHECKPOINT", "EXIT_DATA", "EXIT_INTERRUPTED",
           "add_model_arguments", "add_image_budget_argument", "add_checkpoint_arguments", "add_runtime_arguments",
           "flag", "classifier_config", "kernels_text", "setup", "run", "exit_status", "message"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_CHECKPOINT, EXIT_DATA, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130

_STATUS = ((ConfigError, EXIT_USAGE), (CheckpointError, EXIT_CHECKPOINT), (DownloadError, EXIT_CHECKPOINT),
           (ImageError, EXIT_DATA), (DatasetError, EXIT_DATA), (SampleError, EXIT_DATA), (SourceError, EXIT_DATA),
           (TrainingError, EXIT_FAILED))

EXIT_CODES_HELP = f"""\
exit status:
  {EXIT_OK} success (also when the reader of stdout stops early, | head), {EXIT_FAILED} failed (training),
  {EXIT_USAGE} usage error, {EXIT_CHECKPOINT} checkpoint could not be fetched or loaded,
  {EXIT_DATA} input data failed (some images, or the dataset: the others are still processed; a video source),
  {EXIT_INTERRUPTED} interrupted (except a stream, which Ctrl-C ends like the end of its input).
"""

ENVIRONMENT_HELP = """\
environment:
  HF_ENDPOINT                    Hub endpoint or mirror for the released weights [https://huggingface.co]
  HF_HUB_OFFLINE                 1: use only the Hub cache, never the network
  HF_HOME, HF_HUB_CACHE          where the Hub cache lives [~/.cache/huggingface, $HF_HOME/hub]
  HF_TOKEN                       Hub access token (not needed for the released weights)
  VIM_RPI_CACHE                  cache of checkpoint URLs (and of weights earlier versions fetched) [~/.cache/vim-rpi]
  CAUSAL_CONV1D_FORCE_FALLBACK   TRUE: never upstream's CUDA conv kernels under --backend auto
  SELECTIVE_SCAN_FORCE_FALLBACK  TRUE: never upstream's CUDA scan kernels under --backend auto
  SELECTIVE_SCAN_CPU_BACKEND     CPU inference kernels under --backend auto: auto, torch or numba [auto]
"""


def add_model_arguments(parser, *, model_flags=("-m", "--model"), checkpoint=True):
    """The options that say which model to load and how (shared by infer_rpi.py and serve_rpi.py)."""
    parser.add_argument(*model_flags, dest="model", metavar="NAME",
                        help="registered model name or alias, e.g. vim_tiny, vim_small_stride8 "
                             "[default: the one the checkpoint holds; Vim-Tiny without --checkpoint]")
    if checkpoint:
        parser.add_argument("-c", "--checkpoint", metavar="PATH|URL|hf-hub:REPO/FILE",
                            help="checkpoint file, http(s) URL or Hub file hf-hub:OWNER/REPO/FILE (downloaded "
                                 "once into the cache) [default: the released weights of --model (from the "
                                 "Hugging Face Hub, HF_ENDPOINT for a mirror); Vim-Tiny's without it]")
        parser.add_argument("-t", "--threads", type=int, default=os.cpu_count() or 1, metavar="N",
                            help="CPU threads [%(default)s, this machine's cores]")
        parser.add_argument("--quantize", choices=("none", "dynamic-int8"), default="none",
                            help="dynamic-int8: int8 weights for the linear layers [%(default)s]")
        parser.add_argument("--exact-preprocess", action="store_true",
                            help="decode JPEGs at full size (the official pixels) instead of the "
                                 "faster reduced-scale decode")
        add_image_budget_argument(parser)
    parser.add_argument("--input-size", type=int, metavar="PX",
                        help="side of the square model input [default: the checkpoint's, 224]")
    add_checkpoint_arguments(parser)


def add_image_budget_argument(parser):
    """--max-image-mb, the memory budget per image."""
    parser.add_argument("--max-image-mb", type=float, default=image_budget.DEFAULT_MAX_IMAGE_MB, metavar="MB",
                        help="most memory one image may take while it is decoded and preprocessed (its pixels, "
                             "the decoder's buffers, the 8-bit and rotated copies, the resize), worked out from "
                             "its header; a larger image is refused before decoding [%(default)s]")


def add_checkpoint_arguments(parser):
    """--ema and --trust-checkpoint, spelled and explained the same in every front end."""
    parser.add_argument("--ema", action="store_true",
                        help="use the checkpoint's model_ema weights instead of model")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="allow the checkpoint to unpickle arbitrary Python objects; this can "
                             "run code, so only for files you trust")


def add_runtime_arguments(parser):
    """--device and --backend."""
    parser.add_argument("--device", default="cpu", metavar="DEV",
                        help="cpu, or cuda where a CUDA build of torch finds a GPU [%(default)s]")
    parser.add_argument("--backend", choices=backends.BACKENDS, default="auto",
                        help="kernel backend: auto picks the model's kernels at load (upstream's CUDA "
                             "kernels for a CUDA device, numba or torch on the CPU) [%(default)s]")


def flag(name):
    """The command line's spelling of option `name`: --max-image-mb for max_image_mb."""
    return "--" + name.replace("_", "-")


def kernels_text(report):
    """The kernels a model runs (`mamba_ssm.kernel_report`) as the front ends print them:
    "mixer numba (conv numba, scan numba), norm numba"."""
    return (f"mixer {report['mixer']} (conv {report['causal_conv1d']}, scan {report['selective_scan']}), "
            f"norm {report['rms_norm']}")


def classifier_config(parser, args, spell=flag, **values):
    """The ClassifierConfig of the parsed options: each field from the option of its name where
    the front end has one, `values` over them. A value it refuses is a usage error (exit 2) that
    names the option as `spell` writes it."""
    given = {field.name: getattr(args, field.name) for field in dataclasses.fields(ClassifierConfig)
             if hasattr(args, field.name)}
    try:
        return ClassifierConfig(**{**given, **values})
    except ConfigError as error:
        parser.error(message(error, spell))


class _HubRecords(logging.Filter):
    """huggingface_hub's records on stderr: its retry loop logs two warnings per retry (the failed
    request, then the wait before the next): the wait is kept, one line per retry (the final error
    names the failure); under -q only its errors."""

    def __init__(self, quiet):
        super().__init__()
        self.quiet = quiet

    def filter(self, record):
        if not (record.name == "huggingface_hub" or record.name.startswith("huggingface_hub.")):
            return True
        if record.levelno >= logging.ERROR:
            return True
        return not self.quiet and "thrown while requesting" not in record.getMessage()


def setup(quiet, rank=0):
    """Logging to stderr (info unless quiet; other ranks of a distributed job: errors only;
    huggingface_hub: see _HubRecords), and stdout that prints what its encoding cannot hold (a
    non-UTF-8 file name) backslash-escaped."""
    level = logging.ERROR if rank else logging.WARNING if quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.addFilter(_HubRecords(quiet or rank))
    logging.basicConfig(level=level, handlers=[handler])
    for client in ("httpx", "httpx2"):  # huggingface_hub's HTTP client logs every request at info level
        logging.getLogger(client).setLevel(max(level, logging.WARNING))
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")


def exit_status(error):
    """The exit code for one of our errors (VimError subclasses)."""
    for kind, status in _STATUS:
        if isinstance(error, kind):
            return status
    return EXIT_FAILED


def run(parser, work, *, prefix=lambda: "error", spell=flag):
    """Call `work()` and return its exit status; our errors become one line on stderr (options
    named as `spell` writes them), after `prefix()`, and their exit code (a ConfigError is a usage
    error: argparse's message, exit 2).
    A reader of stdout that went away (| head) ends it quietly with status 0, whatever the
    output mode: the reader stopped because it had what it wanted."""
    try:
        status = work()
        sys.stdout.flush()  # output still buffered meets a closed pipe here, not at exit
        return status
    except BrokenPipeError:
        # Python flushes stdout again at exit, which would fail the same way: the rest goes nowhere.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_OK
    except ConfigError as error:
        parser.error(message(error, spell))
    except (CheckpointError, DownloadError, ImageError, DatasetError, SampleError, SourceError,
            TrainingError) as error:
        print(f"{prefix()}: {message(error, spell)}", file=sys.stderr)
        return exit_status(error)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def message(error, spell=flag):
    """The user-facing line of `error`, options named as `spell` writes them. An exception raised
    in a DataLoader worker is re-raised with the worker's whole traceback as its message; its last
    line is the original one."""
    text = error.render(spell) if isinstance(error, VimError) else str(error)
    last = text.strip().splitlines()[-1] if text.strip() else repr(error)
    name = f"{type(error).__module__}.{type(error).__qualname__}: "
    return last[len(name):] if last.startswith(name) else last

