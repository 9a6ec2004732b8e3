"""The on-disk cache of the fused numba kernels (`bimamba_v2_numba`): machine code compiled by
numba once per CPU, checked, then loaded by llvmlite alone.

Start-up: importing numba and loading its on-disk cache costs ~0.4 s here (~0.8 s on a Pi, as
issue 13 measured), more than the fused kernels save on one image. So numba only compiles: set-up
(`python -m mamba_ssm.kernel_check`) compiles the kernels as C functions (numba.cfunc) and stores
LLVM's machine code for this CPU in one file; later processes load it with llvmlite alone (~25 ms,
numba is not imported) and call the kernels through ctypes, which releases the GIL.

An entry is one file, `<name>-<key>.kernels`, so its parts cannot come from different compiles:
    line 1   "mamba_ssm-kernels <FORMAT> <size> <sha256>": size and digest of all that follows
    line 2   metadata, JSON: the key, the kernels' symbols (numba numbers them per process: `B2v1`
             becomes `B2v2` after one more @njit), the external functions the code calls
    rest     the object file LLVM emitted
The key hashes the kernel sources (this file's too), the numba and llvmlite versions and the CPU
(name and features), so an upgrade or a copied cache compiles afresh. llvmlite maps whatever
bytes it is given as code and runs it: a damaged file crashes the process (SIGSEGV, SIGILL) or,
worse, changes results. So no byte reaches llvmlite before the size, the digest, the key and the
symbols have been checked. Entries are written to a temporary file in the same directory,
flushed to disk, renamed over the old one, and the rename is flushed too: a power cut leaves the
old entry or the new one (an SD card loses unflushed data); the temporary file is removed on any
failure (a full disk included).

Where (`cache_dirs`): NUMBA_CACHE_DIR alone when set (as numba's own cache); else __pycache__ next
to this file (where set-up, run with sudo, writes it), then $XDG_CACHE_HOME/mamba_ssm
(~/.cache/mamba_ssm). The first valid entry is loaded, from a read-only directory too. Without
one the kernels are compiled (seconds) and stored in the first directory that takes them.
Whatever goes wrong is said once per process, in one RuntimeWarning naming the files:
    a damaged entry         compiled again and replaced; when its directory is read-only,
                            compiled into the next one and reported (delete it, or re-run set-up
                            as its owner); when no directory is writable, `CacheError`: the
                            pure-PyTorch path runs, cheaper than a compile in every process
    no writable directory   a compile in every process: the warning names the directories, the
                            cost and NUMBA_CACHE_DIR
    a rejected entry        set-up's check (`reject`) found its kernels computing something else
                            than the pure-PyTorch path: `load` refuses it (RuntimeError), so models
                            run the pure-PyTorch path and say why once, until the marker
                            `<entry>.rejected` is deleted or a new numba, CPU or source changes the key
"""

import contextlib
import ctypes
import hashlib
import importlib.metadata
import json
import os
import pathlib
import tempfile
import warnings

from mamba_ssm import env

FORMAT = 2
_MAGIC = "mamba_ssm-kernels"
_MAX_BYTES = 64 << 20  # an entry is ~40 KB; anything this large is not one (and is not read whole)
_COMPILE_COST = "a compile of several seconds and about 80 MB more memory in every process"
# numba's runtime functions that cfunc wrappers reference on their error path only (when a kernel
# raises). These kernels cannot raise (no allocation, no bounds checks, numpy's float error model)
# and numba is not loaded to provide them: they are bound to abort() unless numba already is.
_ERROR_PATH_SYMBOLS = ("numba_gil_ensure", "numba_gil_release", "NRT_MemInfo_call_dtor")


class CacheError(RuntimeError):
    """A damaged cache entry that cannot be replaced; the message names it and what to do."""


class DamagedEntry(Exception):
    """An entry that failed a check; the message says which."""


def cache_dirs():
    """The directories an entry is looked up in, in order (see the module docstring)."""
    chosen = env.numba_cache_dir()
    if chosen is not None:
        return [chosen]
    dirs = [pathlib.Path(__file__).resolve().parent / "__pycache__"]
    try:
        user = env.user_cache_dir()
    except (RuntimeError, KeyError):  # no home directory
        return dirs
    return dirs + [user / "mamba_ssm"]


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

    digest = hashlib.sha256(f"{FORMAT} {numba_version} {llvmlite.__version__} {cpu}".encode())
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


def encode(key, obj, meta):
    """The bytes of an entry: the object file `obj` and its metadata (see the module docstring)."""
    body = json.dumps(dict(meta, key=key), sort_keys=True).encode() + b"\n" + obj
    return f"{_MAGIC} {FORMAT} {len(body)} {hashlib.sha256(body).hexdigest()}\n".encode() + body


def decode(data, key, kernel_names):
    """(object bytes, metadata) of an entry's bytes, after checking them against their header and
    `key`, and that the object defines the symbols of `kernel_names`. Raises DamagedEntry saying what
    is wrong (nothing in `data` can make this crash or hang)."""
    if not data:
        raise DamagedEntry("it is empty")
    header, newline, body = data.partition(b"\n")
    fields = header.split(b" ")
    if (not newline or len(fields) != 4 or fields[0] != _MAGIC.encode() or not fields[2].isdigit()
            or len(fields[2]) > 12):
        raise DamagedEntry("it does not start with a kernel cache header")
    if fields[1] != str(FORMAT).encode():
        raise DamagedEntry(f"it is in format {fields[1].decode(errors='replace')}, not {FORMAT}")
    if len(body) != int(fields[2]):
        raise DamagedEntry(f"it holds {len(body)} bytes after its header, which says {int(fields[2])}")
    if hashlib.sha256(body).hexdigest().encode() != fields[3]:
        raise DamagedEntry("its sha256 differs from its header's")
    text, _, obj = body.partition(b"\n")
    try:
        meta = json.loads(text)
    except (ValueError, RecursionError):
        raise DamagedEntry("its metadata is not JSON") from None
    if not isinstance(meta, dict):
        raise DamagedEntry("its metadata is not a JSON object")
    if meta.get("key") != key:
        raise DamagedEntry("it was made by another compile (its key differs)")
    symbols, externals = meta.get("symbols"), meta.get("externals")
    if not (isinstance(symbols, dict) and all(isinstance(symbols.get(name), str) for name in kernel_names)
            and isinstance(externals, list) and all(isinstance(name, str) for name in externals)):
        raise DamagedEntry("its metadata does not list the kernels' symbols and external functions")
    for name in kernel_names:
        if symbols[name].encode() not in obj:
            raise DamagedEntry(f"its object code does not define {symbols[name]} (kernel {name!r})")
    return obj, meta


def _read(path, key, kernel_names):
    """(object bytes, metadata) of the entry at `path`, or None when there is none; raises
    DamagedEntry when there is one that fails a check, or cannot be read."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > _MAX_BYTES:
                raise DamagedEntry(f"it is {size} bytes, too large for a kernel cache")
            data = f.read()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        raise DamagedEntry(f"it cannot be read: {e.strerror or e}") from None
    return decode(data, key, kernel_names)


def _unwritable(directory):
    """Why an entry cannot be written into `directory`, or None: tried for real (root's
    permissions and read-only mounts included) with a nameless temporary file, in the directory
    or, when it does not exist yet, in the nearest one above it (nothing is created)."""
    while not directory.exists() and directory.parent != directory:
        directory = directory.parent
    try:
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as e:
        return e.strerror or str(e)
    return None


def write(path, data):
    """Replace the file `path` by `data`, durably (see the module docstring); raises OSError and
    then leaves no temporary file behind."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.fchmod(fd, 0o644)  # whatever the umask: set-up writes it as root for a service's user
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:  # Ctrl-C included
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    with contextlib.suppress(OSError):  # some file systems cannot flush a directory: the data is on disk
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


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
    """Machine code in memory: `addresses` {kernel name: address}; `path`, the cache entry it
    was loaded from or stored in (None when it could not be stored). The kernels live in memory
    it owns: keep it referenced while they may run."""

    def __init__(self, engine, path, addresses):
        self._engine, self.path, self.addresses = engine, path, addresses


def _rejection(path):
    return path.with_name(f"{path.name}.rejected")


def reject(path, reason):
    """Mark the entry at `path` as computing wrong results (`reason`: one line): `load` then
    refuses it. Raises OSError when the marker cannot be written."""
    write(_rejection(path), reason.encode())


def _refuse_rejected(paths):
    """Raise RuntimeError when `reject` marked one of the candidate entries `paths` (all of one
    key, so all the same code: a recompile would bring the wrong kernels back)."""
    for path in paths:
        marker = _rejection(path)
        try:
            with open(marker, "rb") as f:
                reason = f.read(1000).decode(errors="replace").strip()
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as e:
            reason = f"the marker cannot be read: {e.strerror or e}"
        raise RuntimeError(f"set-up's check found the kernels in {path} wrong ({reason}); delete {marker} "
                           "to use them again after a fix")


def _find(paths, key, kernel_names):
    """The first valid entry: (path, its bytes' (object, metadata)) or (None, None), and
    {path: what is wrong} for the damaged ones before it."""
    damaged = {}
    for path in paths:
        try:
            entry = _read(path, key, kernel_names)
        except DamagedEntry as e:
            damaged[path] = str(e)
            continue
        if entry is not None:
            return path, entry, damaged
    return None, None, damaged


def load(name, sources, define_kernels, kernel_names):
    """The kernels `define_kernels()` compiles ({name: numba cfunc}), from the cache entry
    `name`-<key>.kernels, compiled and stored first when no valid one exists (see the module
    docstring). sources: the files the kernels are made of (part of the key). Returns a `Code`.
    Warns (RuntimeWarning, once) about damaged entries and a cache that cannot be written.
    Raises CacheError for a damaged entry that cannot be replaced, ImportError without numba,
    RuntimeError for a failed compile or load."""
    import llvmlite.binding as llvm

    try:
        llvm.initialize()  # llvmlite < 0.45 needs it; later ones initialize LLVM themselves and refuse it
    except RuntimeError:
        pass
    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    machine, cpu = _target_machine(llvm)
    key = _cache_key(cpu, (*sources, pathlib.Path(__file__).resolve()))
    paths = [directory / f"{name}-{key}.kernels" for directory in cache_dirs()]
    _refuse_rejected(paths)
    path, entry, damaged = _find(paths, key, kernel_names)
    problems = []
    if entry is None:
        unwritable = {}  # directory -> why an entry cannot be written there
        candidates = iter(paths)

        def next_writable():
            for candidate in candidates:
                unwritable[candidate.parent] = _unwritable(candidate.parent)
                if unwritable[candidate.parent] is None:
                    return candidate
            return None

        target = next_writable()
        if target is None and damaged:  # a compile in every process would cost more than the torch path
            bad = next(iter(damaged))
            raise CacheError(f"the kernel cache {bad} is damaged ({damaged[bad]}) and cannot be replaced "
                             f"({unwritable[bad.parent]}): delete it or re-run set-up as its owner, "
                             "or set NUMBA_CACHE_DIR to a writable directory")
        entry = _compile(llvm, machine, define_kernels)
        while target is not None:
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                write(target, encode(key, *entry))
                path = target
                break
            except OSError as e:
                unwritable[target.parent] = e.strerror or str(e)
                target = next_writable()
        if path is None:
            where = "; ".join(f"{directory}: {why}" for directory, why in unwritable.items())
            problems.append(f"the fused kernels' cache cannot be written ({where}), which costs {_COMPILE_COST}; "
                            "set NUMBA_CACHE_DIR to a writable directory")
    for bad, why in damaged.items():
        if bad == path:
            problems.append(f"the kernel cache {bad} was damaged ({why}); it was compiled again")
            continue
        try:
            write(bad, encode(key, *entry))
            problems.append(f"the kernel cache {bad} was damaged ({why}); it was replaced by "
                            + (f"a copy of {path}" if path else "a fresh compile"))
        except OSError as e:
            problems.append(f"the kernel cache {bad} is damaged ({why}) and cannot be replaced "
                            f"({e.strerror or e}): delete it or re-run set-up as its owner")
    obj, meta = entry
    _resolve_externals(llvm, meta["externals"])
    engine = llvm.create_mcjit_compiler(llvm.parse_assembly(""), machine, use_lmm=True)
    engine.add_object_file(llvm.ObjectFileRef.from_data(obj))
    engine.finalize_object()
    addresses = {}
    for kernel in kernel_names:
        address = engine.get_function_address(meta["symbols"][kernel])
        if not address:
            raise RuntimeError(f"{path or 'the compiled code'} has no kernel {kernel!r}")
        addresses[kernel] = address
    if problems:
        warnings.warn("; ".join(problems), RuntimeWarning, stacklevel=2)
    return Code(engine, path, addresses)
