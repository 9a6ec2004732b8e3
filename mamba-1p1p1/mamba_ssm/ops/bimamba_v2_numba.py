"""Vim's bidirectional ("v2") mixer between in_proj and out_proj as two fused numba CPU kernels
(and the block's residual add + RMSNorm as a third one, `add_rms_norm`).

Glossary: b batch, l sequence length, d channels (d_inner), n state size, r dt rank, w conv width;
direction 0 reads the sequence forward, direction 1 backward (its own parameters, upstream's _b).

Inference only (no autograd), float32, any b, l, d. The math is upstream's fused v2 path
(`bimamba_v2.bimamba_v2_fast` computes the same in pure PyTorch):

    kernel 1, per (direction, batch row, block of 16 time steps), in parallel:
        x_s  = x[s] forward, x[l-1-s] backward        (read by index: no flipped copy)
        xc_t = silu(bias + sum_k conv_weight[k] * x_{t-w+1+k})              -> xc (2, b, l, d)
    x_dbl = x_proj(xc): torch matmuls (`bimamba_v2.project_x`)            -> (2, b, l, r + 2n)
    kernel 2, per (batch row, block of channels), in parallel; both directions in turn:
        dt_t = softplus(dt_bias + dt_weight^T x_dbl[t, :r])    (dt_proj inside the scan)
        h_t  = exp(dt_t A) h_{t-1} + dt_t xc_t B_t,  B_t = x_dbl[t, r:r+n], h_0 = 0, h: (n, block)
        y_t  = C_t h_t + D xc_t,                     C_t = x_dbl[t, r+n:]
        out[t'] (+)= y_t * silu(z[t']) * (1/2 if if_divide_out), t' = t, or l-1-t backward
so nothing of size l * d * n and no (2, b, l, d) dt, gate or flipped tensor is ever written.
The two directions of one output element run in the same work item, which makes their sum a
plain in-place add (no second buffer, no extra pass). The state of a work item (n x block) and
its A stay in L1; the channel block is chosen per call (`_channel_block`) so that the items
split evenly over the threads (Vim-Tiny at batch 1: 3 items of 128 channels on 1 or 3 threads,
4 of 96 on 2 or 4). exp, silu and softplus are `numba_math`'s vectorizable float32 versions.

Start-up: numba only compiles, once per CPU; later processes load the machine code with llvmlite
alone (`kernel_cache`) and call the kernels through ctypes, which releases the GIL.

Threads: torch.get_num_threads() of torch's own OpenMP team run each kernel (`_openmp_runtime`);
threads of ours lost the cores to that team's spin-waiting.
"""

import ctypes
import os
import pathlib
import threading

import numpy as np
import torch

from mamba_ssm.ops import kernel_cache
from mamba_ssm.ops.bimamba_v2 import project_x

# Channels per scan work item: larger blocks spend less per (step, state row) on loop set-up (on
# this x86 machine, 1 thread: 32 channels 1.48 ms per Vim-Tiny layer, 64 1.36, 128 1.25), smaller
# ones split the work more evenly over threads: `_channel_block` takes the largest whose split
# wastes at most 1/8 of a thread's share.
BLOCKS = (128, 96, 64, 48, 32, 16)
CONV_STEPS = 16  # time steps per conv work item (each reads the whole channel row: long loops)
NORM_ROWS = 16  # rows per add + RMSNorm work item
_HERE = pathlib.Path(__file__).resolve().parent
_SOURCES = (_HERE / "bimamba_v2_numba.py", _HERE / "numba_math.py")  # what the compiled code is made of


def _define_kernels():
    """Compile the kernels with numba (imported here only). Returns {name: numba cfunc}.

    Each kernel is a C function of one argument, an int64 task array (`_task`): [next item,
    next scratch slot, item count, then the kernel's pointers and sizes]. Every thread that
    runs it takes items from the shared counter until none is left (so a thread that started
    late, or was preempted, does less), and one scratch slot for its own state."""
    from numba import carray, cfunc, types
    from numba.extending import intrinsic

    from mamba_ssm.ops.numba_math import LOG2E, exp2, silu, softplus

    task_type = types.CPointer(types.int64)
    options = dict(fastmath={"contract"}, error_model="numpy", boundscheck=False)

    @intrinsic
    def take(typingctx, task, index):
        """task[index] += 1, atomically; returns the value before."""
        def codegen(context, builder, signature, args):
            counter = builder.gep(args[0], [args[1]])
            return builder.atomic_rmw("add", counter, context.get_constant(types.int64, 1), "monotonic")

        return types.int64(task_type, types.int64), codegen

    @intrinsic
    def floats_at(typingctx, address):
        """The float32 pointer with this address."""
        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], context.get_value_type(signature.return_type))

        return types.CPointer(types.float32)(types.int64), codegen

    @cfunc(types.void(task_type), **options)
    def conv(task):
        """task[3:12] = xz (b, l, 2d), weight (2, w, d), bias (2, d), out (2, b, l, d), b, l, d, w,
        steps; items: (direction, batch row, block of `steps` time steps)."""
        b, l, d, w, steps = task[7], task[8], task[9], task[10], task[11]
        xz = carray(floats_at(task[3]), (b, l, 2 * d))
        weight = carray(floats_at(task[4]), (2, w, d))
        bias = carray(floats_at(task[5]), (2, d))
        out = carray(floats_at(task[6]), (2, b, l, d))
        blocks = (l + steps - 1) // steps
        while True:
            item = take(task, 0)
            if item >= task[2]:
                break
            direction, k, t0 = item // (b * blocks), item // blocks % b, item % blocks * steps
            tb = bias[direction]
            for t in range(t0, min(t0 + steps, l)):
                o = out[direction, k, t]
                for j in range(d):
                    o[j] = tb[j]
                for tap in range(max(0, w - 1 - t), w):
                    s = t - (w - 1) + tap
                    src = xz[k, s if direction == 0 else l - 1 - s]
                    tw = weight[direction, tap]
                    for j in range(d):
                        o[j] += tw[j] * src[j]
                for j in range(d):
                    o[j] = silu(o[j])

    @cfunc(types.void(task_type), **options)
    def scan(task):
        """task[3:19] = u (2, b, l, d), x_dbl (2, b, l, r + 2n), dt_w (2, r, d), dt_b (2, d),
        A (2, n, d), D (2, d), xz (b, l, 2d) (z = xz[..., d:]), y (b, l, d), scratch (threads,
        2n + 3, block), b, l, d, n, r, block, halve; items: (batch row, block of channels)."""
        b, l, d, n, r, block = task[12], task[13], task[14], task[15], task[16], task[17]
        scale = np.float32(0.5) if task[18] else np.float32(1.0)
        u = carray(floats_at(task[3]), (2, b, l, d))
        xdbl = carray(floats_at(task[4]), (2, b, l, r + 2 * n))
        dtw = carray(floats_at(task[5]), (2, r, d))
        dtb = carray(floats_at(task[6]), (2, d))
        A_all = carray(floats_at(task[7]), (2, n, d))
        D = carray(floats_at(task[8]), (2, d))
        xz = carray(floats_at(task[9]), (b, l, 2 * d))
        y = carray(floats_at(task[10]), (b, l, d))
        work = carray(floats_at(task[11] + take(task, 1) * (2 * n + 3) * block * 4), (2 * n + 3, block))
        A, h = work[:n], work[n:2 * n]
        step, dtx, acc = work[2 * n], work[2 * n + 1], work[2 * n + 2]
        blocks = (d + block - 1) // block
        while True:
            item = take(task, 0)
            if item >= task[2]:
                break
            k, j0 = item // blocks, item % blocks * block
            m = min(block, d - j0)
            for direction in range(2):
                for i in range(n):
                    for j in range(m):
                        A[i, j] = A_all[direction, i, j0 + j] * LOG2E  # exp(dt A) = 2^(dt A log2 e)
                        h[i, j] = 0.0
                skip = D[direction, j0:j0 + m]
                for t in range(l):
                    row = xdbl[direction, k, t]
                    ut = u[direction, k, t, j0:j0 + m]
                    bias = dtb[direction, j0:j0 + m]
                    for j in range(m):
                        step[j] = bias[j]
                    for q in range(r):
                        wq, v = dtw[direction, q, j0:j0 + m], row[q]
                        for j in range(m):
                            step[j] += wq[j] * v
                    for j in range(m):
                        step[j] = softplus(step[j])
                        dtx[j] = step[j] * ut[j]
                        acc[j] = skip[j] * ut[j]
                    for i in range(n):
                        bi, ci = row[r + i], row[r + n + i]
                        for j in range(m):
                            state = exp2(step[j] * A[i, j]) * h[i, j] + dtx[j] * bi
                            h[i, j] = state
                            acc[j] += state * ci
                    tt = t if direction == 0 else l - 1 - t
                    z = xz[k, tt, d + j0:d + j0 + m]
                    out = y[k, tt, j0:j0 + m]
                    if direction == 0:
                        for j in range(m):
                            out[j] = acc[j] * silu(z[j]) * scale
                    else:
                        for j in range(m):
                            out[j] += acc[j] * silu(z[j]) * scale

    @intrinsic
    def float64_from_bits(typingctx, bits):
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], context.get_value_type(types.float64))

        return types.float64(types.int64), codegen

    @cfunc(types.void(task_type), **options)
    def add_rms_norm(task):
        """task[3:11] = x (rows, k), residual (rows, k), weight (k,), out (rows, k), s (rows, k),
        rows, k, eps (float64 bits); without a residual (its address 0) s = x is not written;
        items: blocks of NORM_ROWS rows."""
        rows, k, eps = task[8], task[9], float64_from_bits(task[10])
        x = carray(floats_at(task[3]), (rows, k))
        residual = carray(floats_at(task[4] if task[4] else task[3]), (rows, k))
        weight = carray(floats_at(task[5]), (k,))
        out = carray(floats_at(task[6]), (rows, k))
        s = carray(floats_at(task[7] if task[4] else task[3]), (rows, k))
        while True:
            item = take(task, 0)
            if item >= task[2]:
                break
            for row in range(item * NORM_ROWS, min(item * NORM_ROWS + NORM_ROWS, rows)):
                xs, rs, ss, o = x[row], residual[row], s[row], out[row]
                if task[4]:
                    for j in range(k):
                        ss[j] = xs[j] + rs[j]
                total = 0.0  # float64: a sequential float32 sum of k squares would lose ~k/2 ulp
                for j in range(k):
                    total += ss[j] * ss[j]
                scale = np.float32(1.0 / np.sqrt(total / k + eps))
                for j in range(k):
                    o[j] = ss[j] * scale * weight[j]

    return {"conv": conv, "scan": scan, "add_rms_norm": add_rms_norm}


# ---- compiled code: built by numba once, loaded by llvmlite (`kernel_cache`) ----------------------

class _Kernels:
    """The loaded machine code: each kernel as an (address, ctypes function) pair, and
    `openmp`, torch's GOMP_parallel (or None)."""

    def __init__(self):
        code = kernel_cache.load("bimamba_v2_numba", _SOURCES, _define_kernels, ("conv", "scan", "add_rms_norm"))
        self._code, self.path = code, code.path  # _code owns the memory the kernels live in
        for name, address in code.addresses.items():
            setattr(self, name, (address, ctypes.CFUNCTYPE(None, ctypes.c_void_p)(address)))
        self.openmp = _openmp_runtime()


def _openmp_runtime():
    """GOMP_parallel of the OpenMP runtime torch runs its CPU threads on, or None.

    The kernels run in parallel on torch's own OpenMP threads: after each parallel op they
    spin for a while waiting for the next, so threads of ours would have to share the cores
    with them (measured: 2 threads of ours ran the fused mixer no faster than 1 thread did).
    GOMP_parallel(fn, data, threads, 0) runs fn(data) on the calling thread and threads - 1 of
    the team (libgomp; LLVM's and Intel's runtimes provide the same entry point).
    """
    torch_dir = str(pathlib.Path(torch.__file__).resolve().parent)  # torch/ and auditwheel's torch.libs/
    try:
        with open("/proc/self/maps") as maps:
            paths = {fields[5] for fields in (line.split(maxsplit=5) for line in maps) if len(fields) == 6}
    except OSError:
        return None
    names = ("libgomp", "libomp", "libiomp5")
    runtimes = sorted(p.strip() for p in paths if os.path.basename(p.strip()).startswith(names))
    ours = [p for p in runtimes if p.startswith(torch_dir)]
    for path in ours or runtimes[:1]:
        parallel = getattr(ctypes.CDLL(path), "GOMP_parallel", None)  # the library already loaded
        if parallel is not None:
            parallel.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint)
            parallel.restype = None
            return parallel
    return None


_state_lock = threading.Lock()
_state = {}  # "kernels": _Kernels, or "error": the one-line cause of the failure


def _kernels():
    if "kernels" not in _state:
        with _state_lock:
            if not _state:
                try:
                    _state["kernels"] = _Kernels()
                    _state["pid"] = os.getpid()
                except Exception as e:  # any failure means "use the torch path": say why, once
                    cause = str(e).strip().splitlines()
                    _state["error"] = f"{type(e).__name__}: {cause[0] if cause else ''}".rstrip(": ")
            if "error" in _state:
                raise RuntimeError(f"the fused numba kernels are unavailable ({_state['error']})")
    return _state["kernels"]


def warm_up():
    """Compile the kernels (into the on-disk cache) or load them; call at set-up time, or at
    model load (it may run in a background thread). Returns the cache entry they were loaded
    from or stored in, or None when none could be written (`kernel_cache`). Raises RuntimeError
    naming the cause."""
    return _kernels().path


def load_error():
    """None when the kernels load (compiling them first if needed), else a one-line cause such
    as "ModuleNotFoundError: No module named 'numba'". Tried once per process; never raises."""
    try:
        _kernels()
    except RuntimeError:
        return _state.get("error", "unknown error")
    return None


def _run(kernels, kernel, task, items, threads):
    """kernel(task) on min(threads, items) threads of torch's OpenMP team, or on this thread
    alone when torch does not run on OpenMP or this is a forked child (whose team is gone).
    ctypes releases the GIL meanwhile."""
    address, call = kernel
    threads = min(threads, items)
    if threads > 1 and kernels.openmp is not None and os.getpid() == _state["pid"]:
        kernels.openmp(address, task.ctypes.data, threads, 0)
    else:
        call(task.ctypes.data)


def _task(items, *fields):
    """The int64 array a kernel reads: [next item = 0, next scratch slot = 0, items, *fields]."""
    return np.array((0, 0, items) + fields, dtype=np.int64)


# ---- the entry point -----------------------------------------------------------------------------

def _check_inputs(**tensors):
    """ValueError unless every given tensor (None allowed) is float32 on the CPU and records no
    autograd: the kernels read raw float32 memory. The weights' layouts are the caller's contract
    (`bimamba_v2.stack_directions` builds them); this guards the activations of each call."""
    for name, t in tensors.items():
        if t is None:
            continue
        if t.dtype != torch.float32 or t.device.type != "cpu":
            raise ValueError(f"the fused numba kernels take float32 CPU tensors, got {name} {t.dtype} on {t.device}")
        if t.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"the fused numba kernels run inference only, but {name} records autograd")


def _channel_block(b, d, threads):
    fair = -(-b * d // threads)  # channels per thread with a perfect split
    for block in BLOCKS:
        if -(-b * -(-d // block) // threads) * min(block, d) <= fair * 9 / 8:
            return block
    return BLOCKS[-1]


def _ptr(t):
    return t.data_ptr()


def bimamba_v2_numba(xz, conv_weight, conv_bias, x_proj, dt_proj_weight, dt_proj_bias, A, D, if_divide_out):
    """Both directions of a v2 mixer, before out_proj (inference; float32 CPU tensors, the weights
    contiguous, as `bimamba_v2.stack_directions` lays them out).

    xz: (b, l, 2d) = [x, z] on the last dim (in_proj's output)
    conv_weight: (2, w, d) (conv1d.weight (d, 1, w) transposed, per direction); conv_bias: (2, d) or None
    x_proj: both directions' x_proj as `bimamba_v2.project_x` takes it (the stacked weights
        transposed, (2, d, r + 2n), or int8 layers' packed weights): x_dbl = [dt_in, B, C]
    dt_proj_weight: (2, r, d) (dt_proj.weight (d, r) transposed); dt_proj_bias: (2, d)
    A: (2, n, d) = -exp(A_log) transposed;  D: (2, d)
    Returns y: (b, l, d) = (y_forward + flip(y_backward)) * silu(z) (/2 when if_divide_out).
    Raises ValueError for activations that are not float32 CPU tensors or record autograd,
    RuntimeError when the kernels cannot be loaded (`load_error` says why).
    """
    kernels = _kernels()
    _check_inputs(xz=xz)
    b, l, d2 = xz.shape
    d, w, n, r = d2 // 2, conv_weight.shape[1], A.shape[1], dt_proj_weight.shape[1]
    threads = torch.get_num_threads()
    xz = xz.contiguous()
    if conv_bias is None:
        conv_bias = conv_weight.new_zeros(2, d)
    xc = xz.new_empty(2, b, l, d)
    items = 2 * b * -(-l // CONV_STEPS)
    task = _task(items, _ptr(xz), _ptr(conv_weight), _ptr(conv_bias), _ptr(xc), b, l, d, w, CONV_STEPS)
    _run(kernels, kernels.conv, task, items, threads)
    x_dbl = project_x(xc, x_proj)  # (2, b, l, r + 2n)
    if x_dbl.dtype != torch.float32 or not x_dbl.is_contiguous():
        x_dbl = x_dbl.to(torch.float32, memory_format=torch.contiguous_format)
    y = xz.new_empty(b, l, d)
    block = _channel_block(b, d, threads)
    items = b * -(-d // block)
    work = np.empty((min(threads, items), 2 * n + 3, block), np.float32)
    task = _task(items, _ptr(xc), _ptr(x_dbl), _ptr(dt_proj_weight), _ptr(dt_proj_bias), _ptr(A), _ptr(D), _ptr(xz),
                 _ptr(y), work.ctypes.data, b, l, d, n, r, block, int(bool(if_divide_out)))
    _run(kernels, kernels.scan, task, items, threads)
    return y


def add_rms_norm(x, residual, weight, eps):
    """Block's fused add + RMSNorm (inference; float32 CPU tensors): x, residual (..., k) or
    residual None; weight (k,). Returns (out, s) with s = x + residual (x itself without a
    residual) and out = s / sqrt(mean(s^2) + eps) * weight, as `rms_norm_fn(..., prenorm=True)`.
    Raises ValueError for other tensors, RuntimeError when the kernels cannot be loaded."""
    kernels = _kernels()
    _check_inputs(x=x, residual=residual, weight=weight)
    x = x.contiguous()
    weight = weight.contiguous()
    residual = None if residual is None else residual.contiguous()  # referenced until the kernel ran
    rows, k = x.numel() // x.shape[-1], x.shape[-1]
    out = x.new_empty(x.shape)
    s = x if residual is None else x.new_empty(x.shape)
    items = -(-rows // NORM_ROWS)
    eps_bits = int(np.float64(eps).view(np.int64))
    task = _task(items, _ptr(x), 0 if residual is None else _ptr(residual), _ptr(weight), _ptr(out), _ptr(s), rows,
                 k, eps_bits)
    _run(kernels, kernels.add_rms_norm, task, items, torch.get_num_threads())
    return out, s
