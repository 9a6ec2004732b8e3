"""Vim-Tiny on the CPU next to a DeiT-Tiny yardstick: latency, dispatched ops, memory.

    python scripts/benchmark.py                   # the full table (about a minute)
    python scripts/benchmark.py --json            # one JSON object on stdout instead
    python scripts/benchmark.py --quick --tiny    # every variant once, toy sizes (CI smoke test)

Timed in this process, after warm-up, interleaved: every repetition runs each variant once
(round-robin, grouped by thread count), so load from other processes hits all variants alike:
  vim fp32    the default fast path with the pure-PyTorch kernels (model.set_backend("torch")):
              the issue's targets are about this one
  vim int8    the same with dynamic-int8 Linear layers (vim/quantization.py)
  vim numba   set_backend("numba"): each v2 mixer runs the fused numba kernels
              (mamba_ssm/ops/bimamba_v2_numba.py; only when numba is installed)
  vim ref     the sequential reference kernels (set_backend("ref")); slow, so it runs only every
              few repetitions
The Vim variants share one randomly initialised model (one int8 copy), told each variant's
backend before its forward is timed (and its inference weights built then, untimed).
  deit fp32   DeiT-Tiny built from torch.nn only (16 px patches, 12 pre-norm
              nn.TransformerEncoderLayer(192, 3, 768, gelu), cls token, position embedding,
              LayerNorm, head): 1.25 G multiply-adds against Vim-Tiny's 1.41 G
at batch 1 for each thread count, and the fp32 variants at batch 8 on all cores (throughput).
Latency is the median and the p90 (nearest rank) in ms; "x deit" divides by the DeiT median
at the same threads and batch, which is the headline number.

Also measured, in fresh processes so that nothing of this one is counted:
  - peak RSS of `vim/infer_rpi.py --json` on one generated image with a random-weight checkpoint
    (fp32 and dynamic-int8 with the torch kernel, fp32 with numba when installed), and of a
    process that only imports torch;
  - wall time of that fresh infer_rpi.py (fp32), torch kernel against numba, runs interleaved
    (--cold-repeats each, medians), with the numba kernels' cache warmed beforehand as set-up does;
  - cold start: in a fresh process per kernel (all cores), the first forward against the median
    of the next ones, after what a CLI does at model load: mamba_simple.build_inference_constants
    and, for numba, bimamba_v2_numba.warm_up(); their time is reported apart (the numba kernels
    themselves load when the model resolves its kernels, at build, before that);
  - minor page faults per forward with glibc's default malloc, then after runtime.tune_malloc()
    (this process runs with tune_malloc applied).
Ops dispatched per forward are counted with a TorchDispatchMode: every aten op that reaches
the dispatcher below autograd, views included.

The table goes to stdout, progress to stderr.
"""

import argparse
import importlib.metadata
import importlib.util
import json
import math
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

import mamba_ssm
import vim_rpi
from mamba_ssm.env import CPU_BACKEND_ENV
from mamba_ssm.modules.mamba_simple import build_inference_constants
from vim_rpi import checkpoint_io, quantization, runtime

VIM_DIR = pathlib.Path(__file__).resolve().parent.parent / "vim"
THROUGHPUT_BATCH = 8
HAS_NUMBA = importlib.util.find_spec("numba") is not None
TINY = dict(depth=2, img_size=32)  # --tiny: 5 tokens, 2 layers; same widths as the real models
_MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


class DeiTTiny(nn.Module):
    """DeiT-Tiny's architecture from torch.nn parts: (b, 3, S, S) images -> (b, num_classes) logits.

    Random weights: only its speed is used.
    """

    def __init__(self, img_size=224, depth=12, dim=192, heads=3, mlp=768, num_classes=1000, patch=16):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, (img_size // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, heads, mlp, activation="gelu", norm_first=True, batch_first=True)
            for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (b, M, dim)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


def build_parser():
    parser = argparse.ArgumentParser(
        prog="benchmark.py", description=__doc__.split("\n\n")[0],
        epilog="See the module docstring (python -m pydoc scripts/benchmark.py) for what each number means.")
    parser.add_argument("-m", "--model", default="vim_tiny", metavar="NAME",
                        help="Vim model to time [%(default)s]; the yardstick stays DeiT-Tiny")
    parser.add_argument("-r", "--repeats", type=int, default=20, metavar="N",
                        help="timed runs per batch-1 variant [%(default)s]")
    parser.add_argument("--ref-repeats", type=int, default=3, metavar="N",
                        help="timed runs of the slow reference path [%(default)s]")
    parser.add_argument("--batch-repeats", type=int, default=5, metavar="N",
                        help="timed runs per batch-8 variant [%(default)s]")
    parser.add_argument("--warmup", type=int, default=2, metavar="N", help="untimed runs per variant [%(default)s]")
    parser.add_argument("-t", "--threads", type=int, nargs="+", metavar="N",
                        help="thread counts [1, 2 and all cores]")
    parser.add_argument("--quick", action="store_true", help="every variant once, no warm-up (smoke test)")
    parser.add_argument("--tiny", action="store_true",
                        help=f"toy sizes ({TINY['depth']} layers, {TINY['img_size']} px) for a fast smoke test")
    parser.add_argument("--no-processes", action="store_true",
                        help="skip the fresh-process measurements (peak RSS, page faults)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--cold-repeats", type=int, default=3, metavar="N",
                        help="fresh infer_rpi.py runs per scan kernel for the wall time [%(default)s]")
    parser.add_argument("--fault-probe", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cold-probe", choices=("torch", "numba"), help=argparse.SUPPRESS)
    return parser


def check_args(parser, args):
    if not vim_rpi.is_model(args.model):
        names = ", ".join(vim_rpi.list_models(include_aliases=True))
        parser.error(f"unknown model {args.model!r}; choose one of {names}")
    for name in ("repeats", "ref_repeats", "batch_repeats", "cold_repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.threads and min(args.threads) < 1:
        parser.error(f"--threads must be >= 1, got {min(args.threads)}")
    if args.quick:
        args.repeats = args.ref_repeats = args.batch_repeats = args.cold_repeats = 1
        args.warmup = 0
    cores = os.cpu_count() or 1
    args.threads = sorted(set(args.threads or (1, min(2, cores), cores)))


_START = time.perf_counter()


def _log(message):
    print(f"[{time.perf_counter() - _START:6.1f} s] {message}", file=sys.stderr, flush=True)


def model_kwargs(args):
    return dict(TINY) if args.tiny else {}


def image_size(args):
    return TINY["img_size"] if args.tiny else vim_rpi.pretrained_cfg(args.model)["input_size"][-1]


def build_models(args):
    """name -> eval-mode model: "vim" (fp32), "vim int8", "deit"."""
    torch.manual_seed(0)
    vim = vim_rpi.create_model(args.model, **model_kwargs(args)).eval()
    deit = DeiTTiny(img_size=image_size(args), depth=TINY["depth"] if args.tiny else 12).eval()
    return {"vim": vim, "vim int8": quantization.quantize_model(vim, "dynamic-int8"), "deit": deit}


# (name, model, backend): the Vim variants on the fast kernels, then every batch-1 variant
FAST_VIMS = [("vim fp32", "vim", "torch"), ("vim int8", "vim int8", "torch")]
FAST_VIMS += [("vim numba", "vim", "numba")] if HAS_NUMBA else []
BATCH1_VARIANTS = FAST_VIMS + [("vim ref", "vim", "ref"), ("deit fp32", "deit", "torch")]


def plan(args):
    """The timed variants: dicts with name, model, backend ("torch" or "numba" on the fast path, or
    "ref"), threads, batch, runs."""
    variants = []
    for threads in args.threads:
        for name, model, backend in BATCH1_VARIANTS:
            runs = args.ref_repeats if backend == "ref" else args.repeats
            variants.append(dict(name=name, model=model, backend=backend, threads=threads, batch=1, runs=runs))
    for name, model, backend in [v for v in FAST_VIMS if v[1] == "vim"] + [("deit fp32", "deit", "torch")]:
        variants.append(dict(name=name, model=model, backend=backend, threads=max(args.threads),
                             batch=THROUGHPUT_BATCH, runs=args.batch_repeats))
    return variants


def _tell(model, backend):
    """Tell a Vim model `backend` (untimed: its kernels resolved, its inference weights built),
    unless it runs that one already; DeiT has no kernel backends."""
    if hasattr(model, "set_backend") and mamba_ssm.kernel_report(model)["backend"] != backend:
        build_inference_constants(model.set_backend(backend))
    return model


def _forward(model, x):
    with torch.inference_mode():
        return model(x)


def time_variants(variants, models, inputs, args):
    """Round-robin timing. Returns one list of wall times (ms) per variant.

    Repetition r runs a variant with `runs` timed runs only when r * runs // repeats advances,
    so slow variants are spread evenly over the whole run instead of bunched at its start.
    """
    rounds = max(v["runs"] for v in variants)
    times = [[] for _ in variants]
    for r in range(-args.warmup, rounds):
        if r == 0 or (r > 0 and r % 5 == 0) or r == rounds - 1:
            _log(f"round {r + 1}/{rounds}" if r >= 0 else "warm-up")
        for i, v in enumerate(variants):
            due = r < 0 or (r + 1) * v["runs"] // rounds > r * v["runs"] // rounds
            if not due:
                continue
            runtime.set_threads(v["threads"])
            model = _tell(models[v["model"]], v["backend"])
            start = time.perf_counter()
            _forward(model, inputs[v["batch"]])
            if r >= 0:
                times[i].append((time.perf_counter() - start) * 1e3)
    return times


def summarize(variant, ms):
    ms = sorted(ms)
    median = statistics.median(ms)
    return {**{k: variant[k] for k in ("name", "backend", "threads", "batch")}, "runs": len(ms),
            "median_ms": median, "p90_ms": ms[math.ceil(0.9 * len(ms)) - 1], "min_ms": ms[0],
            "images_per_s": variant["batch"] * 1e3 / median}


def add_ratios(rows):
    """'x_deit' on every row (Vim or DeiT median / DeiT median at the same threads and batch)."""
    deit = {(r["threads"], r["batch"]): r["median_ms"] for r in rows if r["name"] == "deit fp32"}
    for r in rows:
        r["x_deit"] = r["median_ms"] / deit[(r["threads"], r["batch"])]


def headline(rows):
    """Per thread count (batch 1): Vim/DeiT, ref/fast and fp32/int8 median ratios, and the numba
    kernel's Vim/DeiT when it ran."""
    at = {(r["name"], r["threads"]): r["median_ms"] for r in rows if r["batch"] == 1}
    out = {"vim_over_deit": {}, "ref_over_fast": {}, "fp32_over_int8": {}}
    for (name, threads), ms in at.items():
        key = str(threads)
        if name == "vim fp32":
            out["vim_over_deit"][key] = ms / at[("deit fp32", threads)]
            out["ref_over_fast"][key] = at[("vim ref", threads)] / ms
            out["fp32_over_int8"][key] = ms / at[("vim int8", threads)]
        elif name == "vim numba":
            out.setdefault("numba_over_deit", {})[key] = ms / at[("deit fp32", threads)]
    return out


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def count_ops(model, x, backend):
    """{"total": ops dispatched by one forward, "top": the 5 most frequent ops}."""
    _forward(_tell(model, backend), x)  # a steady-state forward follows
    counter = _OpCounter()
    with counter:
        _forward(model, x)
    return {"total": sum(counter.ops.values()), "top": dict(counter.ops.most_common(5))}


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "processor\t: arm")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(malloc_tuned, args):
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "machine": platform.machine(),
        "cores": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        # the kernels a model of the timed kind runs on the default backend ("auto")
        "backend": mamba_ssm.kernel_report(vim_rpi.create_model(args.model, **model_kwargs(args))),
        "numba": importlib.metadata.version("numba") if HAS_NUMBA else None,
        "malloc_tuned": malloc_tuned,
        "load_average": list(os.getloadavg()),
    }


# ---- fresh-process measurements -------------------------------------------------------------

_TORCH_ONLY = "import resource, torch; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in _MALLOC_ENV}
    return {**env, **extra}


def _via_small_parent(command):
    """Run `command` as a grandchild of /bin/sh: Linux carries a parent's RSS into the peak
    (ru_maxrss) of a child it execs, so a direct child of this big process would report at
    least this process's RSS. The shell forks (the command is not its last) and stays small."""
    if not os.path.exists("/bin/sh"):
        return command
    return ["/bin/sh", "-c", '"$@"; exit $?', "sh", *command]


def _write_inputs(args, root):
    """A random-weight checkpoint of the timed model and a generated JPEG."""
    from PIL import Image

    torch.manual_seed(0)
    model = vim_rpi.create_model(args.model, **model_kwargs(args))
    checkpoint = root / "random-weights.pth"
    checkpoint_io.save_checkpoint(checkpoint, model)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (300, 400, 3), dtype=torch.uint8, generator=generator)
    image = root / "generated.jpg"
    Image.fromarray(pixels.numpy()).save(image, quality=90)
    return checkpoint, image


def infer_rpi_command(checkpoint, image, quantize):
    """The command line of a fresh `infer_rpi.py --json` classifying `image` (the one place that
    knows how the CLI is started)."""
    return [sys.executable, str(VIM_DIR / "infer_rpi.py"), "--json", "-q", "-c", str(checkpoint),
            "--quantize", quantize, str(image)]


def _fresh(command, env):
    """Run `command` in a fresh process; returns (stdout, wall seconds)."""
    start = time.perf_counter()
    done = subprocess.run(_via_small_parent(command), env=env, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr}")
    return done.stdout, wall


def process_measurements(args):
    """Fresh processes, one at a time: peak RSS (MB), page faults per forward, infer_rpi.py wall
    times (torch against numba, interleaved) and the cold-start probes."""
    kernels = ("torch", "numba") if HAS_NUMBA else ("torch",)
    if HAS_NUMBA:
        from mamba_ssm.ops import bimamba_v2_numba

        _log("numba kernels: compiling into the cache if needed (set-up's warm-up)")
        bimamba_v2_numba.warm_up()
    with tempfile.TemporaryDirectory(prefix="vim-bench-") as tmp:
        root = pathlib.Path(tmp)
        checkpoint, image = _write_inputs(args, root)
        probe = [sys.executable, str(pathlib.Path(__file__).resolve()), "--model", args.model]
        probe += ["--tiny"] if args.tiny else []
        commands = {  # name: (command, scan kernel)
            "import_torch": ([sys.executable, "-c", _TORCH_ONLY], "torch"),
            "infer_rpi_int8": (infer_rpi_command(checkpoint, image, "dynamic-int8"), "torch"),
            "faults": (probe + ["--fault-probe"], "torch"),
        }
        for kernel in kernels:
            commands[f"cold_{kernel}"] = (probe + ["--cold-probe", kernel] + ["--threads", str(max(args.threads))],
                                          kernel)
        for r in range(args.cold_repeats):  # interleaved, so load from other processes hits both alike
            for kernel in kernels:
                name = "infer_rpi_fp32" + ("" if kernel == "torch" else "_numba")
                commands[f"{name}#{r}"] = (infer_rpi_command(checkpoint, image, "none"), kernel)
        outputs, walls = {}, {}
        for key, (command, kernel) in commands.items():
            _log(f"fresh process: {key}")
            env = _clean_env(VIM_RPI_CACHE=str(root / "cache"), **{CPU_BACKEND_ENV: kernel})
            outputs[key], walls[key] = _fresh(command, env)
    rss = {"import_torch": float(outputs["import_torch"])}
    wall_ms = {}
    for key in outputs:
        if key.startswith("infer_rpi"):
            name = key.split("#")[0]
            rss[name] = max(rss.get(name, 0.0), json.loads(outputs[key])["peak_rss_mb"])
            wall_ms.setdefault(name, []).append(walls[key] * 1e3)
    wall_ms = {name: {"median_ms": statistics.median(ms), "runs": len(ms)} for name, ms in wall_ms.items()
               if name.startswith("infer_rpi_fp32")}
    cold = {kernel: json.loads(outputs[f"cold_{kernel}"]) for kernel in kernels}
    return rss, json.loads(outputs["faults"]), wall_ms, cold


def _faults_per_forward(model, x, runs):
    import resource

    for _ in range(2):  # warm-up: first calls allocate caches and fault in code
        _forward(model, x)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(runs):
        _forward(model, x)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / runs


def fault_probe(args):
    """Child process (started without MALLOC_* variables): minor page faults per batch-1 forward
    with glibc's default malloc, then again after runtime.tune_malloc()."""
    runtime.set_threads(1)
    torch.manual_seed(0)
    model = vim_rpi.create_model(args.model, **model_kwargs(args)).eval().set_backend("torch")
    x = torch.randn(1, 3, image_size(args), image_size(args))
    runs = 1 if args.quick else 5
    default = _faults_per_forward(model, x, runs)
    tuned = runtime.tune_malloc()
    print(json.dumps({"default": default, "tuned": _faults_per_forward(model, x, runs) if tuned else None,
                      "runs": runs}))


def cold_probe(args):
    """Child process: one forward after building the model and preparing it as a CLI does at
    model load, then the next ones; prints the times in ms as JSON."""
    runtime.tune_malloc()
    runtime.set_threads(max(args.threads))
    torch.manual_seed(0)
    model = vim_rpi.create_model(args.model, **model_kwargs(args)).eval().set_backend(args.cold_probe)
    x = torch.randn(1, 3, image_size(args), image_size(args))
    start = time.perf_counter()
    build_inference_constants(model)
    if args.cold_probe == "numba":
        from mamba_ssm.ops import bimamba_v2_numba

        bimamba_v2_numba.warm_up()
    load_ms = (time.perf_counter() - start) * 1e3
    times = []
    for _ in range(1 if args.quick else 6):
        start = time.perf_counter()
        _forward(model, x)
        times.append((time.perf_counter() - start) * 1e3)
    warm = statistics.median(times[1:]) if len(times) > 1 else times[0]
    print(json.dumps({"load_ms": load_ms, "first_ms": times[0], "warm_ms": warm,
                      "first_over_warm": times[0] / warm, "threads": torch.get_num_threads()}))


# ---- report -----------------------------------------------------------------------------------

def run(args):
    report = {"config": {"model": vim_rpi.resolve_model_name(args.model), "image_size": image_size(args),
                         "tiny": args.tiny, "repeats": args.repeats, "ref_repeats": args.ref_repeats,
                         "batch_repeats": args.batch_repeats, "warmup": args.warmup, "threads": args.threads}}
    if not args.no_processes:
        rss, faults, wall_ms, cold = process_measurements(args)
        report["peak_rss_mb"] = rss
        report["page_faults_per_forward"] = faults
        report["infer_rpi_wall"] = wall_ms
        report["cold_start"] = cold
    malloc_tuned = runtime.tune_malloc()
    report["environment"] = environment(malloc_tuned, args)
    models = build_models(args)
    size = image_size(args)
    generator = torch.Generator().manual_seed(0)
    inputs = {b: torch.randn(b, 3, size, size, generator=generator) for b in (1, THROUGHPUT_BATCH)}
    runtime.set_threads(max(args.threads))
    report["dispatched_ops"] = {"method": "TorchDispatchMode: aten ops per batch-1 forward, views included"}
    for name, model, backend in BATCH1_VARIANTS:
        _log(f"counting dispatched ops: {name}")
        report["dispatched_ops"][name] = count_ops(models[model], inputs[1], backend)
    variants = plan(args)
    times = time_variants(variants, models, inputs, args)
    rows = [summarize(v, ms) for v, ms in zip(variants, times)]
    add_ratios(rows)
    report["results"] = rows
    report["headline"] = headline(rows)
    report["environment"]["load_average_end"] = list(os.getloadavg())
    return report


def _ratios(values):
    return ", ".join(f"{v:.2f}x at {t} thread{'s' if t != '1' else ''}" for t, v in values.items())


def print_table(report):
    env, cfg = report["environment"], report["config"]
    print(f"{cfg['model']} at {cfg['image_size']} px{' (tiny)' if cfg['tiny'] else ''}; torch {env['torch']}, "
          f"{env['cpu']} ({env['cores']} cores, {env['cpu_capability']}); scan backend "
          f"{env['backend']['selective_scan']}, conv backend {env['backend']['causal_conv1d']}; malloc tuned "
          f"{env['malloc_tuned']}; load average {env['load_average'][0]:.2f} -> {env['load_average_end'][0]:.2f}")
    print(f"{'variant':<10} {'threads':>7} {'batch':>5} {'runs':>4} {'median ms':>10} {'p90 ms':>9} "
          f"{'img/s':>7} {'x deit':>7}")
    for r in report["results"]:
        print(f"{r['name']:<10} {r['threads']:>7} {r['batch']:>5} {r['runs']:>4} {r['median_ms']:>10.1f} "
              f"{r['p90_ms']:>9.1f} {r['images_per_s']:>7.1f} {r['x_deit']:>7.2f}")
    h = report["headline"]
    print(f"Vim/DeiT (fp32, batch 1, medians): {_ratios(h['vim_over_deit'])}")
    if "numba_over_deit" in h:
        print(f"Vim with the fused numba kernels / DeiT: {_ratios(h['numba_over_deit'])}")
    print(f"reference path / fast path: {_ratios(h['ref_over_fast'])}")
    print(f"fp32 / dynamic-int8: {_ratios(h['fp32_over_int8'])}")
    ops = report["dispatched_ops"]
    print(f"ops dispatched per forward ({ops['method']}): "
          + ", ".join(f"{k} {v['total']}" for k, v in ops.items() if k != "method"))
    if "peak_rss_mb" in report:
        rss = report["peak_rss_mb"]
        numba = ""
        if "infer_rpi_fp32_numba" in rss:
            numba = f", infer_rpi fp32 numba kernels {rss['infer_rpi_fp32_numba']:.0f}"
        print(f"peak RSS MB: import torch only {rss['import_torch']:.0f}, infer_rpi fp32 {rss['infer_rpi_fp32']:.0f}, "
              f"infer_rpi dynamic-int8 {rss['infer_rpi_int8']:.0f}{numba}")
        faults = report["page_faults_per_forward"]
        tuned = "not applied" if faults["tuned"] is None else f"{faults['tuned']:.0f}"
        print(f"minor page faults per forward (1 thread): default malloc {faults['default']:.0f}, "
              f"after runtime.tune_malloc() {tuned}")
        wall = report["infer_rpi_wall"]
        numba = wall.get("infer_rpi_fp32_numba")
        print("fresh infer_rpi.py on one image, wall time (median of "
              f"{wall['infer_rpi_fp32']['runs']}): torch kernel {wall['infer_rpi_fp32']['median_ms']:.0f} ms"
              + (f", numba {numba['median_ms']:.0f} ms" if numba else ""))
        for kernel, c in report["cold_start"].items():
            print(f"cold start, {kernel}, {c['threads']} threads: first forward {c['first_ms']:.1f} ms, warm "
                  f"{c['warm_ms']:.1f} ms, {c['first_over_warm']:.2f}x (load-time preparation before it "
                  f"{c['load_ms']:.0f} ms)")


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    if args.fault_probe:
        fault_probe(args)
        return 0
    if args.cold_probe:
        cold_probe(args)
        return 0
    report = run(args)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
