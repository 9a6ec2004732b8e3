"""Classify images with Vision Mamba on the CPU: built for a Raspberry Pi, runs on any CPU.

    python vim/infer_rpi.py                  the bundled sample photo (vim/data/sample.jpg)
    python vim/infer_rpi.py photo.jpg
    python vim/infer_rpi.py --json --threads 4 --quantize dynamic-int8 a.jpg b.png photos/
    python vim/infer_rpi.py --video 0 --every-s 1         # USB webcam (also: picam, clip.mp4)
    find photos -name '*.jpg' | python vim/infer_rpi.py --paths-from - --json

A thin shell around `vim_rpi.Classifier` (and `vim_rpi.streams` for --video and --paths-from,
which classify with the model loaded once). Imports only torch, numpy, Pillow, tqdm, this
project's packages and, to fetch the released weights, huggingface_hub (no torchvision, no timm;
OpenCV or picamera2 only for --video), which keeps start-up time and memory low on a Pi.
Without --checkpoint, the released Vim-Tiny weights are fetched once from the Hugging Face Hub
(HF_ENDPOINT names a mirror) into its cache. Results go to stdout; progress, warnings and errors
to stderr.
"""

import argparse
import json
import logging
import math
import os
import statistics
import sys
import time
from pathlib import Path

try:
    from vim_rpi import cli, paths, pi_camera, streams
    from vim_rpi.classifier import Classifier, check_topk
    from vim_rpi.errors import ConfigError, ImageError, SourceError
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
    A directory stands for the images in it (sorted; --recursive descends).
  --video SOURCE: one line per classified frame (seconds since the start, frame index, top-1
    probability and label, inference ms); with --json, JSON Lines flushed per frame:
    {{"frame", "t_s", "topk", "timing_ms"}}. The model always takes the newest frame: frames
    that arrive while it is busy are skipped, never queued. SOURCE is a video file (replayed at
    its frame rate), a camera index (0 = /dev/video0) or device path (/dev/v4l/by-id/...),
    through OpenCV, or picam (the Pi camera module, through picamera2). Ends at the end of a
    file, after --max-frames, on Ctrl-C (status 0), or when the camera goes away or a file is
    damaged, cut short or holds no frame (one line, status {cli.EXIT_DATA}).
  --paths-from FILE|-: image paths, one per line, each classified as it arrives; text blocks,
    or with --json JSON Lines {{"image", "topk", "timing_ms"}} or {{"image", "error"}}.
    Ctrl-C ends it like the end of the input (status 0, or {cli.EXIT_DATA} if a path failed).

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
                        help="image files, or directories of images, to classify [the bundled sample "
                             "photo, vim/data/sample.jpg]")
    # The older spelling of IMAGE, still taken (repeatable), no longer shown.
    parser.add_argument("--image", action="append", default=[], help=argparse.SUPPRESS)
    cli.add_model_arguments(parser)
    parser.add_argument("-k", "--topk", type=int, metavar="K",
                        help="number of classes to show per image [5, or every class of a smaller head]")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--benchmark", type=int, default=0, metavar="N",
                        help="after warm-up, run the first image's forward N more times and "
                             "report median and p90 latency")
    streaming = parser.add_argument_group("streams (the model is loaded once)")
    streaming.add_argument("--video", metavar="SOURCE",
                           help="classify frames continuously: a video file, a camera index (0 = "
                                "/dev/video0) or device (/dev/v4l/by-id/...), or picam (the Raspberry Pi "
                                "camera module)")
    streaming.add_argument("--picam-fps", type=float, metavar="F",
                           help=f"with --video picam: at most F frames per second from the camera "
                                f"[{pi_camera.PICAM_FPS:g}]")
    streaming.add_argument("--picam-mode", type=_mode_size, metavar="WxH",
                           help="with --video picam: the sensor mode to read (`rpicam-hello --list-cameras` "
                                "lists them) [the smallest full-field mode at least "
                                f"{pi_camera.FRAME_HEIGHT} rows tall, e.g. 1640x1232 on Camera Module 2]")
    streaming.add_argument("--max-frames", type=int, metavar="N", help="with --video: stop after N classified frames")
    streaming.add_argument("--every-s", type=float, default=0.0, metavar="S",
                           help="with --video: at most one classification every S seconds [%(default)s: "
                                "as fast as the model goes]")
    streaming.add_argument("--paths-from", metavar="FILE",
                           help="read image paths from FILE (- for stdin), one per line, classifying "
                                "each as it arrives")
    streaming.add_argument("--recursive", action="store_true",
                           help="directories given as IMAGE or in --paths-from: include sub-directories")
    cli.add_runtime_arguments(parser)
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress bar or information on stderr (errors still shown)")
    return parser


def _mode_size(text: str) -> tuple:
    """--picam-mode WxH -> (w, h)."""
    width, _, height = text.lower().partition("x")
    if not (width.isdigit() and height.isdigit() and int(width) > 0 and int(height) > 0):
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, such as 1640x1232, got {text!r}")
    return int(width), int(height)


def _check_picam_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.video != "picam" and (args.picam_fps is not None or args.picam_mode is not None):
        parser.error("--picam-fps and --picam-mode go with --video picam")
    if args.picam_fps is not None and not 0 < args.picam_fps <= 1000:
        parser.error(f"--picam-fps must be in (0, 1000], got {args.picam_fps:g}")


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject usage errors (exit 2) before any slow work."""
    args.images = args.images + args.image
    inputs = [flag for flag, given in (("IMAGE", args.images), ("--video", args.video is not None),
                                       ("--paths-from", args.paths_from is not None)) if given]
    if len(inputs) > 1:
        parser.error(f"give one kind of input, not {' and '.join(inputs)}")
    if args.video is None and (args.max_frames is not None or args.every_s):
        parser.error("--max-frames and --every-s go with --video")
    if args.video is not None and (args.benchmark or args.recursive):
        parser.error("--benchmark and --recursive do not go with --video")
    if args.paths_from is not None and args.benchmark:
        parser.error("--benchmark does not go with --paths-from")
    if args.max_frames is not None and args.max_frames < 1:
        parser.error(f"--max-frames must be >= 1, got {args.max_frames}")
    if not args.every_s >= 0:
        parser.error(f"--every-s must be >= 0, got {args.every_s}")
    if args.benchmark < 0:
        parser.error(f"--benchmark must be >= 0, got {args.benchmark}")
    _check_picam_args(parser, args)
    try:
        check_topk(args.topk)
    except ConfigError as error:
        parser.error(cli.message(error))
    args.config = cli.classifier_config(parser, args)


def load(args) -> Classifier:
    """The Classifier of the options (this process tuned for it), checked against --topk."""
    if args.trust_checkpoint:
        _log.warning("--trust-checkpoint: unpickling the checkpoint may run code from it")
    clf = Classifier(config=args.config, tune_process=True, progress=not args.quiet, warmup=False)
    clf.check_topk(args.topk)
    return clf


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


def classify_path(clf: Classifier, image, topk: int) -> dict:
    """One image file -> its result in the --json schema (an "error" entry when it cannot be read)."""
    try:
        prediction = clf.classify(image, topk)
    except ImageError as e:
        return failed(image, cli.message(e))
    return {"image": image, "topk": prediction.topk, "timing_ms": prediction.timing_ms}


def failed(image, message: str) -> dict:
    """The result of an image that could not be classified; its message also goes to stderr."""
    print(f"error: {message}", file=sys.stderr)
    return {"image": image, "error": message}


def classify_paths(clf: Classifier, given, topk: int, recursive: bool):
    """Yield the result of each image the paths `given` name (a directory: its images, sorted; one
    error result when it holds none). A path that cannot be read (missing, no permission, a FIFO...)
    is one error result, and the paths after it are still classified."""
    for path in given:
        entries = streams.image_paths(path, recursive)
        if not entries:
            yield failed(path, f"{path}: no image files in this directory" + ("" if recursive else " (--recursive descends)"))
        for entry in entries:
            yield failed(entry.path, entry.problem) if entry.problem else classify_path(clf, entry.path, topk)


def run(args) -> tuple:
    """Everything after argument checks. Returns (report dict in the --json schema, exit status)."""
    clf = load(args)
    results = list(classify_paths(clf, args.images, args.topk, args.recursive))
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
    classified = [r["image"] for r in results if "topk" in r]
    if args.benchmark and classified:
        report["benchmark"] = benchmark(clf, clf.preprocess(classified[0]), args.benchmark)
    failed = any("error" in r for r in results)
    return report, cli.EXIT_DATA if failed else cli.EXIT_OK


def _emit(line: str) -> None:
    """One result line of a stream, flushed at once so a reader (| jq) sees it live."""
    print(line, flush=True)


def _ready(clf: Classifier) -> None:
    """Warm the model up (so the first frame or path is not the slow one) and say what runs."""
    clf.warmup()
    info = clf.info()
    _log.info(f"model {info['model']}, {_threads(info['threads'])}, loaded in {clf.load_ms:.0f} ms")


def _threads(count: int) -> str:
    return "1 thread" if count == 1 else f"{count} threads"


def run_video(args) -> int:
    """--video: classify the newest frame whenever the model is free; one line per frame."""
    # FFmpeg, inside OpenCV, would print lines of its own about a damaged or unknown file; the
    # SourceError says what happened in one. OPENCV_FFMPEG_LOGLEVEL=16 shows them again.
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    # before the slow load: a missing camera fails at once
    source = streams.open_video(args.video, picam_fps=args.picam_fps, picam_mode=args.picam_mode)
    try:
        clf = load(args)
    except BaseException:
        source.close()
        raise
    _ready(clf)
    _log.info(f"classifying {source.name} (Ctrl-C stops)")
    stream = streams.LatestFrameStream(source, lambda pixels: clf.classify(pixels, args.topk),
                                       max_frames=args.max_frames, every_s=args.every_s)
    frames = iter(stream)
    try:
        for frame, prediction in frames:
            if args.json:
                _emit(json.dumps({"frame": frame.index, "t_s": round(frame.t_s, 3), "topk": prediction.topk,
                                  "timing_ms": prediction.timing_ms}))
            else:
                best = prediction.topk[0]
                _emit(f"{frame.t_s:8.2f} s  frame {frame.index:>6}  {best['prob']:7.2%}  {best['label']}  "
                      f"({prediction.timing_ms['inference']:.0f} ms)")
    except KeyboardInterrupt:
        _log.info("stopped")
    finally:
        frames.close()  # stops the reader thread and closes the source now, not when collected
    rate = stream.classified / stream.elapsed_s if stream.elapsed_s else 0.0
    _log.info(f"classified {stream.classified} of {stream.frames_read} frames in {stream.elapsed_s:.1f} s "
              f"({rate:.2f} per second)")
    return cli.EXIT_OK


def run_paths(args) -> int:
    """--paths-from: classify each path as its line arrives; one result per path, in order."""
    problem = None if args.paths_from == "-" else paths.stat_path(args.paths_from)[0]
    if problem:  # before the model loads (seconds on a Pi); not opened yet: a FIFO waits for its writer
        raise SourceError(f"--paths-from {problem}")
    clf = load(args)
    try:
        lines = sys.stdin.buffer if args.paths_from == "-" else open(args.paths_from, "rb")
    except OSError as error:
        raise SourceError(f"--paths-from {args.paths_from}: {error.strerror}") from None
    _ready(clf)
    failed = False
    try:
        with lines:
            for result in classify_paths(clf, streams.read_paths(lines), args.topk, args.recursive):
                failed = failed or "error" in result
                if args.json:
                    _emit(json.dumps(result))
                else:
                    print_result(result)
                    sys.stdout.flush()
    except KeyboardInterrupt:
        _log.info("stopped")
    return cli.EXIT_DATA if failed else cli.EXIT_OK


def print_result(result: dict) -> None:
    """One image's block of text: its name, then a top-k table and timings, or why it failed."""
    print(result["image"])
    if "error" in result:
        print(f"  failed: {result['error']}\n")
        return
    print(f"  {'rank':>4}  {'prob':>7}  class")
    for rank, entry in enumerate(result["topk"], 1):
        print(f"  {rank:>4}  {entry['prob']:>7.2%}  {entry['label']}")
    timing = result["timing_ms"]
    print(f"  preprocess {timing['preprocess']:.1f} ms, inference {timing['inference']:.1f} ms\n")


def print_text(report: dict) -> None:
    for result in report["results"]:
        print_result(result)
    print(f"model {report['model']}, {_threads(report['threads'])}, quantize {report['quantize']}, "
          f"torch {report['torch']}; kernels: {cli.kernels_text(report['backend'])}")
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
    if not args.images and args.video is None and args.paths_from is None:
        args.images = [str(SAMPLE_IMAGE)]
        _log.info("no image given: classifying the bundled sample %s", SAMPLE_IMAGE)

    def work():
        if args.video is not None or args.paths_from is not None:
            return run_video(args) if args.video is not None else run_paths(args)
        report, status = run(args)
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            print_text(report)
        return status

    return cli.run(parser, work)


if __name__ == "__main__":
    sys.exit(main())
