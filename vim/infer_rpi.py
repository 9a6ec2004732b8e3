"""Classify images with Vision Mamba on the CPU: built for a Raspberry Pi, runs on any CPU.

    python vim/infer_rpi.py                  the bundled sample photo (vim/data/sample.jpg)
    python vim/infer_rpi.py photo.jpg
    python vim/infer_rpi.py --json --threads 4 --quantize dynamic-int8 a.jpg b.png

A thin shell around `vim_rpi.Classifier`. Imports only torch, numpy, Pillow, tqdm, this
project's packages and, to fetch the released weights, huggingface_hub (no torchvision, no timm),
which keeps start-up time and memory low on a Pi.
Without --checkpoint, the released Vim-Tiny weights are fetched once from the Hugging Face Hub
(HF_ENDPOINT names a mirror) into its cache. Results go to stdout; progress, warnings and errors
to stderr.
"""

import argparse
import json
import logging
import math
import statistics
import sys
import time
from pathlib import Path

try:
    from vim_rpi import cli
    from vim_rpi.classifier import Classifier
    from vim_rpi.errors import ImageError
    from vim_rpi.runtime import peak_rss_mb
except ModuleNotFoundError as missing:  # run from a checkout that was never installed
    sys.exit(f"error: {missing}; install the project first: pip install -e causal-conv1d -e mamba-1p1p1 -e . "
             f"(or bash scripts/setup_rpi.sh)")

_log = logging.getLogger("infer_rpi")

_WARMUP_RUNS = 2  # before --benchmark timing: first calls pay one-time allocation costs
# Classified when no image is given, so a fresh machine has something to try (CC0, see SAMPLE_LICENSE.txt).
SAMPLE_IMAGE = Path(__file__).resolve().parent / "data" / "sample.jpg"

EPILOG = f"""\
output:
  text: per image a table of rank, probability and class name, then timings and peak memory.
  --json: exactly one JSON object on stdout:
    {{"model", "checkpoint", "threads", "quantize", "torch", "backend": {{...}}, "peak_rss_mb",
     "timing_ms": {{"load"}}, "results": [{{"image", "topk": [{{"index", "label", "prob"}}, ...],
     "timing_ms": {{"preprocess", "inference"}}}}, ...], "benchmark": {{"median_ms", "p90_ms",
     "runs"}} (only with --benchmark)}}
    An image that could not be read appears in "results" with an "error" string and no "topk".

{cli.EXIT_CODES_HELP}
{cli.ENVIRONMENT_HELP}"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="infer_rpi.py",
        description="Classify images with Vision Mamba (Vim) on the CPU.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("images", nargs="*", metavar="IMAGE",
                        help="image files to classify [the bundled sample photo, vim/data/sample.jpg]")
    parser.add_argument("--image", action="append", default=[], metavar="PATH",
                        help="an image file (older spelling of IMAGE; repeatable)")
    cli.add_model_arguments(parser)
    parser.add_argument("-k", "--topk", type=int, default=5, metavar="K",
                        help="number of classes to show per image [%(default)s]")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--benchmark", type=int, default=0, metavar="N",
                        help="after warm-up, run the first image's forward N more times and "
                             "report median and p90 latency")
    cli.add_runtime_arguments(parser)
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress bar or information on stderr (errors still shown)")
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject usage errors (exit 2) before any slow work."""
    args.images = args.images + args.image
    if args.topk < 1:
        parser.error(f"--topk must be >= 1, got {args.topk}")
    if args.benchmark < 0:
        parser.error(f"--benchmark must be >= 0, got {args.benchmark}")
    cli.check_environment(parser, args)


def load(args) -> Classifier:
    if args.trust_checkpoint:
        _log.warning("--trust-checkpoint: unpickling the checkpoint may run code from it")
    return Classifier(args.checkpoint, args.model, threads=args.threads, quantize=args.quantize,
                      input_size=args.input_size, exact_preprocess=args.exact_preprocess, backend=args.backend,
                      device=args.device, ema=args.ema, trust_checkpoint=args.trust_checkpoint,
                      progress=not args.quiet, warmup=False)


def benchmark(clf: Classifier, x, runs: int) -> dict:
    """Median and p90 (nearest rank) of `runs` timed forwards of x (3, H, W) after warm-up."""
    batch = x.unsqueeze(0)
    times = []
    for i in range(_WARMUP_RUNS + runs):
        start = time.perf_counter()
        clf.logits(batch)
        if i >= _WARMUP_RUNS:
            times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return {"median_ms": statistics.median(times), "p90_ms": times[math.ceil(0.9 * runs) - 1], "runs": runs}


def run(args) -> tuple:
    """Everything after argument checks. Returns (report dict in the --json schema, exit status)."""
    clf = load(args)
    clf.check_topk(args.topk)
    results, first_input = [], None
    for image in args.images:
        try:
            start = time.perf_counter()
            x = clf.preprocess(image)
            preprocess_ms = (time.perf_counter() - start) * 1e3
        except ImageError as e:
            print(f"error: {e}", file=sys.stderr)
            results.append({"image": image, "error": str(e)})
            continue
        (topk,), inference_ms = clf.predict(x.unsqueeze(0), args.topk)
        results.append({"image": image, "topk": topk,
                        "timing_ms": {"preprocess": preprocess_ms, "inference": inference_ms}})
        if first_input is None:
            first_input = x
    info = clf.info()
    report = {
        "model": info["model"],
        "checkpoint": info["checkpoint"],
        "threads": info["threads"],
        "quantize": info["quantize"],
        "torch": info["torch"],
        "backend": info["backend"],
        "peak_rss_mb": peak_rss_mb(),
        "timing_ms": {"load": clf.load_ms},
        "results": results,
    }
    if args.benchmark and first_input is not None:
        report["benchmark"] = benchmark(clf, first_input, args.benchmark)
    failed = any("error" in r for r in results)
    return report, cli.EXIT_DATA if failed else cli.EXIT_OK


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


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    cli.setup(args.quiet)
    if not args.images:
        args.images = [str(SAMPLE_IMAGE)]
        _log.info("no image given: classifying the bundled sample %s", SAMPLE_IMAGE)

    def work():
        report, status = run(args)
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            print_text(report)
        return status

    return cli.run(parser, work)


if __name__ == "__main__":
    sys.exit(main())
