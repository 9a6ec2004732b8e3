"""Time JPEG decode + eval preprocessing with draft (reduced-scale) decoding vs exact decoding;
with --wide, compare the conversion of 16-bit and float images before and after the memory
budget (issue 18).

    python scripts/bench_preprocess.py                  # synthetic 4000x3000 camera-like JPEG
    python scripts/bench_preprocess.py --image photo.jpg --runs 9 --json
    python scripts/bench_preprocess.py --wide 4000x3000 # 16-bit PNG and float TIFF: old vs new

Prints a table (or one JSON object with --json) of the median and min wall time per path, the
decoded size, and the max / mean absolute difference between the two resulting tensors
(normalized units: 1.0 is about 57 levels of an 8-bit channel). --wide runs each path in a
fresh fork per run and reports the medians of its time and of its peak RSS growth (VmHWM; Linux).
"""

import argparse
import io
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

import numpy as np
from PIL import Image

from vim_rpi.image_preprocess import ImageError, eval_transform, load_image, preprocess_image, resize_size


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


def to_rgb_before_budget(img: Image.Image) -> Image.Image:
    """to_rgb as it was before the memory budget: full-size int64 (16-bit) or float32 (float)
    arrays, then a full-size RGB image. The "old" path of --wide."""
    if img.mode == "F":
        values = np.nan_to_num(np.asarray(img, dtype=np.float32), nan=0.0, posinf=255.0, neginf=0.0)
        if values.size and values.min() >= 0.0 and values.max() <= 1.0:
            values = values * 255.0
        gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    else:
        wide = np.clip(np.asarray(img, dtype=np.int64), 0, 65535)
        gray = ((wide + 128) // 257).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")


def preprocess_before_budget(data: bytes, input_size: int):
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return eval_transform(to_rgb_before_budget(img), input_size)


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024


def forked_runs(fn, runs: int) -> tuple[list[float], list[float]]:
    """Run fn() once in each of `runs` fresh forks: (times in ms, peak RSS growths in MB). A fork's
    VmHWM starts at its RSS, so its growth is what fn() allocated."""
    times, growths = [], []
    for _ in range(runs):
        read_end, write_end = os.pipe()
        child = os.fork()
        if child == 0:
            os.close(read_end)
            before = _peak_rss_mb()
            start = time.perf_counter()
            fn()
            elapsed = (time.perf_counter() - start) * 1000.0
            os.write(write_end, json.dumps([elapsed, _peak_rss_mb() - before]).encode())
            os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end) as pipe:
            elapsed, growth = json.loads(pipe.read())
        os.waitpid(child, 0)
        times.append(elapsed)
        growths.append(growth)
    return times, growths


def wide_images(width: int, height: int, seed: int = 0) -> dict:
    """Encoded 16-bit PNG and float TIFF of smooth noise: {label: bytes}."""
    rng = np.random.default_rng(seed)
    wave = np.outer(np.cos(np.arange(height) / height * 5.0), np.sin(np.arange(width) / width * 7.0))
    unit = np.clip(0.5 + 0.4 * wave + rng.normal(0, 0.03, (height, width)), 0, 1)
    images = {}
    for label, img, fmt, options in (
        ("16-bit PNG", Image.fromarray((unit * 65535).astype(np.uint16)), "PNG", {}),
        ("float TIFF", Image.fromarray(unit.astype(np.float32), "F"), "TIFF", {"compression": "tiff_deflate"}),
    ):
        buffer = io.BytesIO()
        img.save(buffer, fmt, **options)
        images[f"{label} ({img.mode})"] = buffer.getvalue()
    return images


def bench_wide(width: int, height: int, input_size: int, runs: int) -> dict:
    """Old vs new preprocessing of each wide image from its bytes (decode included in both)."""
    results = {}
    # Warm up (imports, first-call allocations) on small images only: memory a full-size run
    # freed here could stay in malloc's heap and be reused in the forks without raising their RSS.
    for data in wide_images(64, 48).values():
        preprocess_before_budget(data, input_size), preprocess_image(data, input_size)
    for label, data in wide_images(width, height).items():
        rows = {}
        for name, fn in (("old", lambda: preprocess_before_budget(data, input_size)),
                         ("new", lambda: preprocess_image(data, input_size))):
            times, growths = forked_runs(fn, runs)
            rows[name] = {"median_ms": statistics.median(times), "min_ms": min(times),
                          "median_peak_mb": statistics.median(growths)}
        old, new = preprocess_before_budget(data, input_size), preprocess_image(data, input_size)
        results[label] = {"paths": rows, "identical": bool((old == new).all()),
                          "time_ratio": rows["old"]["median_ms"] / rows["new"]["median_ms"],
                          "peak_ratio": rows["old"]["median_peak_mb"] / rows["new"]["median_peak_mb"]}
    return {"size": [width, height], "input_size": input_size, "runs": runs, "images": results}


def print_wide(result: dict) -> None:
    w, h = result["size"]
    print(f"{w}x{h} wide images  input {result['input_size']}  runs {result['runs']} (one fresh fork each)")
    print(f"{'image':<22} {'path':<4} {'median ms':>10} {'min ms':>8} {'peak MB':>8}")
    for label, entry in result["images"].items():
        for name, row in entry["paths"].items():
            print(f"{label:<22} {name:<4} {row['median_ms']:>10.1f} {row['min_ms']:>8.1f} {row['median_peak_mb']:>8.1f}")
        print(f"{'':<22} old/new: time {entry['time_ratio']:.2f}x, peak memory {entry['peak_ratio']:.2f}x, "
              f"tensors {'identical' if entry['identical'] else 'DIFFERENT'}")


def parse_size(parser, text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        parser.error(f"sizes must look like 4000x3000, got {text!r}")
    return width, height


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=pathlib.Path, help="JPEG to use (default: synthetic)")
    parser.add_argument("--size", default="4000x3000", help="synthetic image WxH")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--wide", metavar="WxH",
                        help="instead: old vs new preprocessing of a 16-bit PNG and a float TIFF of this size")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    if args.runs < 1 or args.input_size < 1:
        parser.error("--runs and --input-size must be positive")
    if args.wide:
        result = bench_wide(*parse_size(parser, args.wide), args.input_size, args.runs)
        if args.json:
            print(json.dumps(result))
        else:
            print_wide(result)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        path = args.image
        if path is None:
            width, height = parse_size(parser, args.size)
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
