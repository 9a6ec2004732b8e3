"""Throughput and latency of vim/serve_rpi.py: requests/s, p50 and p99 at 1, 2 and 4 concurrent
clients, with batching on (--max-batch 8) and off (--max-batch 1).

    python scripts/bench_serve.py                    # Vim-Tiny at full size, random weights
    python scripts/bench_serve.py --json             # one JSON object on stdout
    python scripts/bench_serve.py -c CKPT --requests 96 --concurrency 1,2,4,8

For each setting it starts the real server as a subprocess on a free loopback port, waits until
/readyz says it is warm, sends a few warm-up requests, then `--requests` POSTs of one photo-sized
JPEG split among the clients (each on its own keep-alive connection), and stops the server with
SIGTERM. Latency is the client's: from sending the request to reading the whole answer.
"""

import argparse
import concurrent.futures
import http.client
import io
import json
import math
import os
import pathlib
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

import vim_rpi
from vim_rpi import checkpoint_io

SERVER = pathlib.Path(__file__).resolve().parent.parent / "vim" / "serve_rpi.py"
TIMEOUT = 120  # seconds: any single wait
WARMUP_REQUESTS = 3


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--checkpoint", help="checkpoint to serve [Vim-Tiny with random weights]")
    parser.add_argument("--requests", type=int, default=48, metavar="N", help="timed requests per cell [%(default)s]")
    parser.add_argument("--concurrency", default="1,2,4", metavar="LIST", help="client counts [%(default)s]")
    parser.add_argument("--max-batch", type=int, default=8, metavar="N", help="batching on: --max-batch [%(default)s]")
    parser.add_argument("-t", "--threads", type=int, default=os.cpu_count() or 1, metavar="N",
                        help="the server's torch threads [%(default)s]")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    try:
        args.concurrency = [int(c) for c in args.concurrency.split(",")]
    except ValueError:
        parser.error(f"--concurrency must be a comma-separated list of integers, got {args.concurrency!r}")
    if args.requests < 1 or min(args.concurrency) < 1 or args.max_batch < 1 or args.threads < 1:
        parser.error("--requests, --concurrency, --max-batch and --threads must be >= 1")
    return args


def photo():
    """A 640 x 480 JPEG with smooth content, about the size of a downscaled phone photo."""
    y, x = np.mgrid[0:480, 0:640]
    pixels = np.stack([x * 255 // 640, y * 255 // 480, (x + y) % 256], axis=-1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint, max_batch, threads, queue):
    """serve_rpi.py on a free port, once /readyz answers 200 -> (process, port)."""
    port = free_port()
    process = subprocess.Popen([sys.executable, str(SERVER), "-c", str(checkpoint), "--port", str(port), "-q",
                                "-t", str(threads), "--max-batch", str(max_batch), "--queue", str(queue)],
                               stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + TIMEOUT
    while True:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with status {process.returncode}")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", "/readyz")
            if connection.getresponse().status == 200:
                return process, port
        except OSError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise SystemExit("the server did not become ready in time")
        time.sleep(0.2)


def stop_server(process):
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def client(port, body, count):
    """`count` classify requests on one keep-alive connection -> latencies in ms."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    latencies = []
    try:
        for _ in range(count):
            start = time.perf_counter()
            connection.request("POST", "/v1/classify", body, {"Content-Type": "image/jpeg"})
            response = connection.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"the server answered {response.status}")
            latencies.append((time.perf_counter() - start) * 1e3)
    finally:
        connection.close()
    return latencies


def percentile(sorted_values, q):
    """Nearest-rank percentile."""
    return sorted_values[max(math.ceil(q / 100 * len(sorted_values)) - 1, 0)]


def measure(port, body, clients, requests):
    """`requests` split among `clients` threads -> {requests_per_s, p50_ms, p99_ms}."""
    client(port, body, WARMUP_REQUESTS)
    shares = [requests // clients + (i < requests % clients) for i in range(clients)]
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        start = time.perf_counter()
        latencies = sorted(ms for f in [pool.submit(client, port, body, n) for n in shares] for ms in f.result())
        elapsed = time.perf_counter() - start
    return {"requests_per_s": len(latencies) / elapsed, "p50_ms": statistics.median(latencies),
            "p99_ms": percentile(latencies, 99), "requests": len(latencies)}


def main(argv=None):
    args = parse_args(argv)
    body = photo()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint
        if checkpoint is None:
            torch.manual_seed(0)
            checkpoint = pathlib.Path(tmp) / "vim_tiny_random.pth"
            checkpoint_io.save_checkpoint(checkpoint, vim_rpi.create_model("vim_tiny"))
        for batching, max_batch in (("on", args.max_batch), ("off", 1)):
            process, port = start_server(checkpoint, max_batch, args.threads, queue=max(args.concurrency) * 2)
            try:
                for clients in args.concurrency:
                    rows.append({"batching": batching, "max_batch": max_batch, "clients": clients,
                                 **measure(port, body, clients, args.requests)})
                    if not args.json:
                        print(f"  batching {batching}, {clients} clients: done", file=sys.stderr)
            finally:
                stop_server(process)
    report = {"checkpoint": str(args.checkpoint or "vim_tiny (random weights)"), "threads": args.threads,
              "torch": torch.__version__, "image_bytes": len(body), "results": rows}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"serve_rpi.py, {report['checkpoint']}, {args.threads} threads, torch {report['torch']}, "
          f"{args.requests} requests per row, a {len(body) // 1024} KB JPEG")
    print("| batching | clients | requests/s | p50 ms | p99 ms |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['batching']} (max {row['max_batch']}) | {row['clients']} | {row['requests_per_s']:.2f} | "
              f"{row['p50_ms']:.0f} | {row['p99_ms']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
