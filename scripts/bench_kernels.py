"""Reference vs fast pure-PyTorch kernels at Vim-Tiny sizes, side by side.

    python scripts/bench_kernels.py [--repeats N] [--threads 1 2] [--json] [--quick]

Cases (batch 1, d_inner 384, d_state 16, conv width 4; L = 197 and 730 tokens): the selective
scan, the causal conv1d, and one whole bidirectional v2 Mamba block (d_model 192, eval,
inference mode). For every repetition the variants run round-robin (interleaved), so machine
noise hits them alike; the table shows medians and the ref/fast speedup.
"""

import argparse
import copy
import json
import platform
import statistics
import sys
import time

import torch

from causal_conv1d import causal_conv1d_fast, causal_conv1d_ref
from mamba_ssm import Mamba
from mamba_ssm.ops.selective_scan_interface import selective_scan_fast, selective_scan_ref

D_MODEL, D_INNER, D_STATE, WIDTH = 192, 384, 16, 4


def _scan_inputs(L):
    g = torch.Generator().manual_seed(0)
    u, delta, z = (torch.randn(1, D_INNER, L, generator=g) for _ in range(3))
    A = -torch.rand(D_INNER, D_STATE, generator=g) * 4
    B, C = (torch.randn(1, D_STATE, L, generator=g) for _ in range(2))
    D, bias = torch.randn(D_INNER, generator=g), torch.randn(D_INNER, generator=g)
    return (u, delta, A, B, C, D, z, bias, True)


def cases(lengths):
    """name -> {variant: zero-argument callable}."""
    torch.manual_seed(0)
    block = Mamba(D_MODEL, bimamba_type="v2", if_divide_out=True).eval()
    blocks = {backend: copy.deepcopy(block).set_backend(backend) for backend in ("ref", "torch")}
    out = {}
    for L in lengths:
        scan_args = _scan_inputs(L)
        x = torch.randn(1, D_INNER, L)
        w, b = torch.randn(D_INNER, WIDTH), torch.randn(D_INNER)
        hidden = torch.randn(1, L, D_MODEL)

        def block_with(backend, hidden=hidden):
            return blocks[backend](hidden)

        out[f"selective_scan L={L}"] = {"ref": lambda a=scan_args: selective_scan_ref(*a),
                                        "fast": lambda a=scan_args: selective_scan_fast(*a)}
        out[f"causal_conv1d L={L}"] = {"ref": lambda x=x, w=w, b=b: causal_conv1d_ref(x, w, b, activation="silu"),
                                       "fast": lambda x=x, w=w, b=b: causal_conv1d_fast(x, w, b, activation="silu")}
        out[f"v2 Mamba block L={L}"] = {"ref": lambda f=block_with: f("ref"), "fast": lambda f=block_with: f("torch")}
    return out


def measure(variants, repeats, warmup):
    """Interleaved timing; returns {variant: [seconds, ...]}."""
    times = {name: [] for name in variants}
    with torch.inference_mode():
        for i in range(warmup + repeats):
            for name, fn in variants.items():
                start = time.perf_counter()
                fn()
                if i >= warmup:
                    times[name].append(time.perf_counter() - start)
    return times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15, help="timed repetitions per variant [15]")
    parser.add_argument("--warmup", type=int, default=3, help="untimed repetitions first [3]")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts [1 2]")
    parser.add_argument("--lengths", type=int, nargs="+", default=[197, 730], help="sequence lengths [197 730]")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--quick", action="store_true", help="one repetition, no warm-up (smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup = 1, 0
    if args.repeats < 1 or min(args.threads) < 1:
        parser.error("--repeats and --threads must be at least 1")
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for case, variants in cases(args.lengths).items():
            print(f"{case}, {threads} thread(s)...", file=sys.stderr)
            t = measure(variants, args.repeats, args.warmup)
            ref_ms, fast_ms = (statistics.median(t[v]) * 1e3 for v in ("ref", "fast"))
            rows.append({"case": case, "threads": threads, "ref_ms": ref_ms, "fast_ms": fast_ms,
                         "speedup": ref_ms / fast_ms, "repeats": args.repeats})
    env = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
           "processor": platform.processor() or platform.machine()}
    if args.json:
        print(json.dumps({"environment": env, "results": rows}, indent=2))
        return 0
    print(f"torch {env['torch']} on {env['machine']}; medians of {args.repeats} interleaved runs")
    print(f"{'case':<24} {'threads':>7} {'ref ms':>10} {'fast ms':>10} {'speedup':>8}")
    for r in rows:
        print(f"{r['case']:<24} {r['threads']:>7} {r['ref_ms']:>10.2f} {r['fast_ms']:>10.2f} {r['speedup']:>7.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
