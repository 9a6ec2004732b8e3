"""Classify images with Vision Mamba on the CPU: built for a Raspberry Pi, runs on any CPU.

    python vim/infer_rpi.py photo.jpg
    python vim/infer_rpi.py --json --threads 4 --quantize dynamic-int8 a.jpg b.png

Imports only torch, numpy, Pillow and this project's packages (no torchvision, no timm), which
keeps start-up time and memory low on a Pi. Without --checkpoint, the released Vim-Tiny weights
are downloaded once into $VIM_RPI_CACHE (else ~/.cache/vim-rpi).

Results go to stdout; progress, warnings and errors to stderr.
"""

import os

# Before our kernel packages are imported: a CPU has none of upstream's compiled kernels to try.
for _variable in ("CAUSAL_CONV1D_FORCE_FALLBACK", "SELECTIVE_SCAN_FORCE_FALLBACK"):
    os.environ.setdefault(_variable, "TRUE")

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from mamba_ssm.ops.backends import backend_report  # noqa: E402

import checkpoint_download  # noqa: E402
import checkpoint_io  # noqa: E402
import image_preprocess  # noqa: E402
import imagenet_labels  # noqa: E402
import models_mamba  # noqa: E402
import quantization  # noqa: E402
import runtime  # noqa: E402

_log = logging.getLogger("infer_rpi")

EXIT_OK, EXIT_USAGE, EXIT_CHECKPOINT, EXIT_IMAGE = 0, 2, 3, 4
_WARMUP_RUNS = 2  # before --benchmark timing: first calls pay one-time allocation costs


class _UsageError(Exception):
    """A usage error only detectable once the model is loaded (reported like argparse's)."""


EPILOG = f"""\
output:
  text: per image a table of rank, probability and class name, then timings and peak memory.
  --json: exactly one JSON object on stdout:
    {{"model", "checkpoint", "threads", "quantize", "torch", "backend": {{...}}, "peak_rss_mb",
     "timing_ms": {{"load"}}, "results": [{{"image", "topk": [{{"index", "label", "prob"}}, ...],
     "timing_ms": {{"preprocess", "inference"}}}}, ...], "benchmark": {{"median_ms", "p90_ms",
     "runs"}} (only with --benchmark)}}
    An image that could not be read appears in "results" with an "error" string and no "topk".

exit status:
  {EXIT_OK} all images classified, {EXIT_USAGE} usage error, {EXIT_CHECKPOINT} checkpoint could not be fetched or loaded,
  {EXIT_IMAGE} some images failed (the others are still classified).

environment:
  VIM_RPI_CACHE                  download cache directory [~/.cache/vim-rpi]
  CAUSAL_CONV1D_FORCE_FALLBACK   set to TRUE by this script unless already set
  SELECTIVE_SCAN_FORCE_FALLBACK  set to TRUE by this script unless already set
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="infer_rpi.py",
        description="Classify images with Vision Mamba (Vim) on the CPU.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("images", nargs="*", metavar="IMAGE", help="image files to classify")
    parser.add_argument("--image", action="append", default=[], metavar="PATH",
                        help="an image file (older spelling of IMAGE; repeatable)")
    parser.add_argument("-m", "--model", metavar="NAME",
                        help="registered model name or alias, e.g. vim_tiny, vim_small_stride8 "
                             "[default: the one the checkpoint holds; Vim-Tiny without --checkpoint]")
    parser.add_argument("-c", "--checkpoint", metavar="PATH|URL",
                        help="checkpoint file or http(s) URL (downloaded once into the cache) "
                             "[default: the released weights of --model; Vim-Tiny's without it]")
    parser.add_argument("-k", "--topk", type=int, default=5, metavar="K",
                        help="number of classes to show per image [%(default)s]")
    parser.add_argument("-t", "--threads", type=int, default=os.cpu_count() or 1, metavar="N",
                        help="CPU threads [%(default)s, this machine's cores]")
    parser.add_argument("--quantize", choices=("none", "dynamic-int8"), default="none",
                        help="dynamic-int8: int8 weights for the linear layers [%(default)s]")
    parser.add_argument("--input-size", type=int, metavar="PX",
                        help="side of the square model input [default: the checkpoint's, 224]")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--benchmark", type=int, default=0, metavar="N",
                        help="after warm-up, run the first image's forward N more times and "
                             "report median and p90 latency")
    parser.add_argument("--device", default="cpu", metavar="DEV",
                        help="cpu, or cuda where a CUDA build of torch finds a GPU [%(default)s]")
    parser.add_argument("--exact-preprocess", action="store_true",
                        help="decode JPEGs at full size (the official pixels) instead of the "
                             "faster reduced-scale decode")
    runtime.add_checkpoint_arguments(parser)
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress bar or information on stderr (errors still shown)")
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> torch.device:
    """Reject usage errors (exit 2) before any slow work; return the device to run on."""
    args.images = args.images + args.image
    if not args.images:
        parser.error("no image given; pass one or more image files")
    if args.topk < 1:
        parser.error(f"--topk must be >= 1, got {args.topk}")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.benchmark < 0:
        parser.error(f"--benchmark must be >= 0, got {args.benchmark}")
    if args.input_size is not None and args.input_size < 16:
        parser.error(f"--input-size must be >= 16 pixels, got {args.input_size}")
    device = runtime.check_common_args(parser, args.model, args.device)
    if args.model is not None and args.checkpoint is None:
        args.checkpoint = models_mamba.pretrained_cfg(args.model)["url"]
        if args.checkpoint is None:
            parser.error(f"no released weights are known for {args.model}; pass --checkpoint PATH")
    if device.type == "cuda" and args.quantize != "none":
        parser.error("--quantize dynamic-int8 runs on the CPU only; drop it or use --device cpu")
    return device


def load(args, device):
    """Fetch, load and quantize the model. Returns (model, info, checkpoint_path, load_ms)."""
    path = checkpoint_download.resolve_checkpoint(args.checkpoint, progress=not args.quiet)
    if args.trust_checkpoint:
        _log.warning("--trust-checkpoint: unpickling %s may run code from it", path)
    _log.info("loading %s", path)
    start = time.perf_counter()
    model, info = checkpoint_io.load_model(
        path, args.model, ema=args.ema, trust_pickle=args.trust_checkpoint, input_size=args.input_size
    )
    model = quantization.quantize_model(model, args.quantize).to(device)
    return model, info, path, _ms_since(start)


def class_names(num_classes: int) -> list:
    if num_classes == imagenet_labels.NUM_CLASSES:
        return imagenet_labels.imagenet_labels()
    return [f"class {i}" for i in range(num_classes)]


def classify(model, x: torch.Tensor, k: int, names: list) -> tuple:
    """Top-k of one image. x: (3, H, W). Returns ([{"index", "label", "prob"}] * k, inference_ms)."""
    start = time.perf_counter()
    with torch.inference_mode():
        logits = model(x.unsqueeze(0))  # (1, num_classes)
    inference_ms = _ms_since(start)
    probs = torch.softmax(logits[0].float(), dim=-1).cpu()
    top = probs.topk(k)
    topk = [
        {"index": i, "label": names[i], "prob": p}
        for p, i in zip(top.values.tolist(), top.indices.tolist())
    ]
    return topk, inference_ms


def benchmark(model, x: torch.Tensor, runs: int) -> dict:
    """Median and p90 (nearest rank) of `runs` timed forwards of x (3, H, W) after warm-up."""
    batch = x.unsqueeze(0)
    times = []
    with torch.inference_mode():
        for i in range(_WARMUP_RUNS + runs):
            start = time.perf_counter()
            model(batch)
            if i >= _WARMUP_RUNS:
                times.append(_ms_since(start))
    times.sort()
    return {
        "median_ms": statistics.median(times),
        "p90_ms": times[math.ceil(0.9 * runs) - 1],
        "runs": runs,
    }


def run(args, device) -> tuple:
    """Everything after argument checks. Returns (report dict in the --json schema, exit status)."""
    runtime.tune_malloc()
    runtime.set_threads(args.threads)
    model, info, path, load_ms = load(args, device)
    num_classes = info["num_classes"]
    if args.topk > num_classes:
        raise _UsageError(f"--topk must be at most the model's {num_classes} classes, got {args.topk}")
    names = class_names(num_classes)
    results, first_input = [], None
    for image in args.images:
        start = time.perf_counter()
        try:
            x = image_preprocess.preprocess_image(image, info["input_size"], exact=args.exact_preprocess)
        except image_preprocess.ImageError as e:
            print(f"error: {e}", file=sys.stderr)
            results.append({"image": image, "error": str(e)})
            continue
        preprocess_ms = _ms_since(start)
        x = x.to(device)
        topk, inference_ms = classify(model, x, args.topk, names)
        results.append({"image": image, "topk": topk,
                        "timing_ms": {"preprocess": preprocess_ms, "inference": inference_ms}})
        if first_input is None:
            first_input = x
    bench = benchmark(model, first_input, args.benchmark) if args.benchmark and first_input is not None else None
    report = {
        "model": info["model"],
        "checkpoint": str(path),
        "threads": torch.get_num_threads(),
        "quantize": args.quantize,
        "torch": torch.__version__,
        "backend": backend_report(torch.empty(0, device=device)),
        "peak_rss_mb": runtime.peak_rss_mb(),
        "timing_ms": {"load": load_ms},
        "results": results,
    }
    if bench is not None:
        report["benchmark"] = bench
    failed = any("error" in r for r in results)
    return report, EXIT_IMAGE if failed else EXIT_OK


def print_text(report: dict) -> None:
    for result in report["results"]:
        print(result["image"])
        if "error" in result:
            print(f"  failed: {result['error']}\n")
            continue
        print(f"  {'rank':>4}  {'prob':>7}  class")
        for rank, entry in enumerate(result["topk"], 1):
            print(f"  {rank:>4}  {entry['prob']:>7.2%}  {entry['label']}")
        timing = result["timing_ms"]
        print(f"  preprocess {timing['preprocess']:.1f} ms, inference {timing['inference']:.1f} ms\n")
    backend = report["backend"]
    print(f"model {report['model']}, {report['threads']} threads, quantize {report['quantize']}, "
          f"torch {report['torch']}, scan {backend['selective_scan']}, "
          f"conv {backend['causal_conv1d']}")
    print(f"load {report['timing_ms']['load']:.0f} ms, peak RSS {report['peak_rss_mb']:.0f} MB")
    if "benchmark" in report:
        bench = report["benchmark"]
        print(f"benchmark: median {bench['median_ms']:.1f} ms, p90 {bench['p90_ms']:.1f} ms "
              f"over {bench['runs']} runs")


def _ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1e3


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    runtime.escape_unencodable_stdout()
    device = check_args(parser, args)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(message)s", stream=sys.stderr)
    try:
        report, status = run(args, device)
    except _UsageError as e:
        parser.error(str(e))
    except (checkpoint_download.DownloadError, checkpoint_io.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CHECKPOINT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_text(report)
    return status


if __name__ == "__main__":
    sys.exit(main())
