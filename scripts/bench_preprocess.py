"""Time JPEG decode + eval preprocessing with draft (reduced-scale) decoding vs exact decoding.

    python scripts/bench_preprocess.py                  # synthetic 4000x3000 camera-like JPEG
    python scripts/bench_preprocess.py --image photo.jpg --runs 9 --json

Prints a table (or one JSON object with --json) of the median and min wall time per path, the
decoded size, and the max / mean absolute difference between the two resulting tensors
(normalized units: 1.0 is about 57 levels of an 8-bit channel).
"""

import argparse
import json
import pathlib
import statistics
import sys
import tempfile
import time

import numpy as np
from PIL import Image

from vim_rpi.image_preprocess import ImageError, load_image, preprocess_image, resize_size


def camera_like_jpeg(path: pathlib.Path, width: int, height: int, seed: int = 0) -> None:
    """Write a smooth scene with sensor-like noise and some sharp edges, quality 92."""
    rng = np.random.default_rng(seed)
    wave = np.outer(np.cos(np.arange(height) / height * 7.0), np.sin(np.arange(width) / width * 9.0))
    img = (120 + 70 * wave).astype(np.float32)[..., None] + np.float32([10, 0, -15])
    img[height // 3 : height // 2, width // 4 : width // 2] += 60  # hard-edged block
    img += rng.normal(0, 6, size=(height, width, 3)).astype(np.float32)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=92)


def time_runs(fn, runs: int) -> tuple[list[float], object]:
    """Call fn() once to warm up, then `runs` times; return the times (ms) and the last result."""
    result = fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - start) * 1000.0)
    return times, result


def bench(path: pathlib.Path, input_size: int, runs: int) -> dict:
    """Measure both paths on one file; returns the numbers printed by main()."""
    rows = {}
    tensors = {}
    for name, exact in (("draft", False), ("exact", True)):
        times, tensors[name] = time_runs(lambda: preprocess_image(path, input_size, exact), runs)
        draft_size = None if exact else resize_size(input_size)
        rows[name] = {
            "median_ms": statistics.median(times),
            "min_ms": min(times),
            "decoded_size": list(load_image(path, draft_size=draft_size).size),
        }
    diff = (tensors["draft"] - tensors["exact"]).abs()
    return {
        "image": str(path),
        "source_size": rows["exact"]["decoded_size"],  # upright, full resolution
        "input_size": input_size,
        "runs": runs,
        "paths": rows,
        "speedup": rows["exact"]["median_ms"] / rows["draft"]["median_ms"],
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
    }


def print_table(result: dict) -> None:
    w, h = result["source_size"]
    print(f"{result['image']}  {w}x{h}  input {result['input_size']}  runs {result['runs']}")
    print(f"{'path':<6} {'median ms':>10} {'min ms':>8}  decoded")
    for name, row in result["paths"].items():
        dw, dh = row["decoded_size"]
        print(f"{name:<6} {row['median_ms']:>10.1f} {row['min_ms']:>8.1f}  {dw}x{dh}")
    print(
        f"speedup {result['speedup']:.1f}x  max |diff| {result['max_abs_diff']:.4f}  "
        f"mean |diff| {result['mean_abs_diff']:.4f}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=pathlib.Path, help="JPEG to use (default: synthetic)")
    parser.add_argument("--size", default="4000x3000", help="synthetic image WxH")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    if args.runs < 1 or args.input_size < 1:
        parser.error("--runs and --input-size must be positive")
    with tempfile.TemporaryDirectory() as tmp:
        path = args.image
        if path is None:
            try:
                width, height = (int(v) for v in args.size.lower().split("x"))
            except ValueError:
                parser.error(f"--size must look like 4000x3000, got {args.size!r}")
            path = pathlib.Path(tmp) / "camera.jpg"
            print(f"writing a {width}x{height} synthetic JPEG", file=sys.stderr)
            camera_like_jpeg(path, width, height)
        try:
            result = bench(path, args.input_size, args.runs)
        except ImageError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
