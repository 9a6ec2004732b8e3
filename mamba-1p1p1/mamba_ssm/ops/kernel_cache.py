"""The on-disk cache of the fused numba kernels (`bimamba_v2_numba`): machine code compiled by
numba once per CPU, loaded by llvmlite alone.

Start-up: importing numba and loading its on-disk cache costs ~0.4 s here (~0.8 s on a Pi, as
issue 13 measured), more than the fused kernels save on one image. So numba only compiles: `warm_up()`
(run at set-up time) compiles the kernels as C functions (numba.cfunc) and stores LLVM's
machine code for this CPU in one object file; later processes load that file with llvmlite
alone (~25 ms, numba is not imported) and call the kernels through ctypes, which releases the
GIL. The cache lives in __pycache__ next to this file, or in NUMBA_CACHE_DIR when set (as
numba's own cache), or ~/.cache/mamba_ssm when the package directory is not writable. Its name
hashes the kernel sources, the numba and llvmlite versions and the CPU (name and features), so
an upgrade or a copied cache compiles afresh.
"""

import ctypes
import hashlib
import importlib.metadata
import json
import os
import pathlib

_CACHE_FORMAT = 1
# numba's runtime functions that cfunc wrappers reference on their error path only (when a kernel
# raises). These kernels cannot raise (no allocation, no bounds checks, numpy's float error model)
# and numba is not loaded to provide them: they are bound to abort() unless numba already is.
_ERROR_PATH_SYMBOLS = ("numba_gil_ensure", "numba_gil_release", "NRT_MemInfo_call_dtor")


def _cache_dir():
    if os.environ.get("NUMBA_CACHE_DIR"):
        return pathlib.Path(os.environ["NUMBA_CACHE_DIR"])
    here = pathlib.Path(__file__).resolve().parent
    if os.access(here, os.W_OK):
        return here / "__pycache__"
    return pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache") / "mamba_ssm"


def _target_machine(llvm):
    """LLVM's machine for this CPU. Unlike numba's JIT (large code model on x86-64), the small
    position-independent model: constants are read relative to the code instead of through
    64-bit absolute addresses (a register and an instruction each) in the inner loops, ~7% of
    the scan. It needs code and data within 2 GB (4 GB on AArch64) of each other, which llvmlite's
    memory manager guarantees by placing all sections of the object in one block (`use_lmm`)."""
    try:
        features = llvm.get_host_cpu_features().flatten()
    except RuntimeError:  # some platforms cannot report them: the CPU name decides alone
        features = ""
    triple = llvm.get_process_triple()
    target = llvm.Target.from_triple(triple)
    machine = target.create_target_machine(cpu=llvm.get_host_cpu_name(), features=features, opt=3,
                                           reloc="pic", codemodel="small")
    return machine, f"{triple} {llvm.get_host_cpu_name()} {features}"


def _cache_key(cpu, sources):
    try:
        numba_version = importlib.metadata.version("numba")
    except importlib.metadata.PackageNotFoundError:
        raise ImportError("numba is not installed (pip install numba)") from None
    import llvmlite

    digest = hashlib.sha256(f"{_CACHE_FORMAT} {numba_version} {llvmlite.__version__} {cpu}".encode())
    for path in sources:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:24]


def _compile(llvm, machine, define_kernels):
    """numba -> LLVM IR -> machine code. Returns (object bytes, {"symbols", "externals"})."""
    kernels = define_kernels()
    irs = [k.inspect_llvm() for k in kernels.values()]
    module = llvm.parse_assembly(irs[0])
    for ir in irs[1:]:
        module.link_in(llvm.parse_assembly(ir))
    module.verify()
    externals = sorted({line.split("@", 1)[1].split("(", 1)[0] for ir in irs for line in ir.splitlines()
                        if line.startswith("declare") and "@llvm." not in line})
    meta = {"symbols": {name: k.native_name for name, k in kernels.items()}, "externals": externals}
    return machine.emit_object(module), meta


def _read_cache(path):
    try:
        meta = json.loads(path.with_suffix(".json").read_text())
        return path.with_suffix(".o").read_bytes(), meta
    except (OSError, ValueError):
        return None


def _write_cache(path, obj, meta):
    """Best effort (a read-only installation still runs, compiling in each process)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for suffix, data in ((".o", obj), (".json", json.dumps(meta).encode())):
            tmp = path.with_suffix(f"{suffix}.{os.getpid()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path.with_suffix(suffix))  # the .json last: it marks a complete entry
    except OSError:
        pass


def _resolve_externals(llvm, names):
    """Make sure the JIT can link every function the object calls (else LLVM aborts the process)."""
    process = ctypes.CDLL(None)
    abort = ctypes.cast(process.abort, ctypes.c_void_p).value
    for name in names:
        if llvm.address_of_symbol(name) or hasattr(process, name):
            continue
        if name not in _ERROR_PATH_SYMBOLS:
            raise RuntimeError(f"the compiled kernels need {name}, which this process does not provide")
        llvm.add_symbol(name, abort)


class Code:
    """Machine code in memory: `addresses` {kernel name: address}, loaded from the cache entry
    `path`. The kernels live in memory it owns: keep it referenced while they may run."""

    def __init__(self, engine, path, addresses):
        self._engine, self.path, self.addresses = engine, path, addresses


def load(name, sources, define_kernels, kernel_names):
    """The kernels `define_kernels()` compiles ({name: numba cfunc}), from the cache entry
    `name`-<key> (compiled and stored first when there is none). sources: the files the kernels
    are made of (they are part of the key). Returns a `Code`; raises on any failure."""
    import llvmlite.binding as llvm

    try:
        llvm.initialize()  # llvmlite < 0.45 needs it; later ones initialize LLVM themselves and refuse it
    except RuntimeError:
        pass
    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    machine, cpu = _target_machine(llvm)
    path = _cache_dir() / f"{name}-{_cache_key(cpu, sources)}"
    cached = _read_cache(path)
    if cached is None:
        cached = _compile(llvm, machine, define_kernels)
        _write_cache(path, *cached)
    obj, meta = cached
    _resolve_externals(llvm, meta["externals"])
    engine = llvm.create_mcjit_compiler(llvm.parse_assembly(""), machine, use_lmm=True)
    engine.add_object_file(llvm.ObjectFileRef.from_data(obj))
    engine.finalize_object()
    addresses = {}
    for kernel in kernel_names:
        address = engine.get_function_address(meta["symbols"][kernel])
        if not address:
            raise RuntimeError(f"{path}.o has no kernel {kernel!r}")
        addresses[kernel] = address
    return Code(engine, path, addresses)
