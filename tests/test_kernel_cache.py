"""The fused kernels' on-disk cache (`mamba_ssm.ops.kernel_cache`) under what an SD card, a full
disk, a read-only installation and concurrent starts do to it, and the set-up check
(`python -m mamba_ssm.kernel_check`).

The entry format's checks and the writer run in this process on synthetic entries (no numba
needed). Everything that loads machine code runs in fresh processes: before these checks a
damaged file killed the process (SIGSEGV, SIGILL) or changed its results. Read-only directories
and a full disk are real: read-only bind mounts and a small tmpfs in a private mount namespace
(`unshare -m`, which needs root; skipped without). Each case that damages an entry compiles the
kernels again in its process (seconds).
"""

import errno
import functools
import hashlib
import importlib.util
import json
import os
import pathlib
import random
import shlex
import subprocess
import sys
import tempfile
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from mamba_ssm.ops import kernel_cache

ROOT = pathlib.Path(__file__).resolve().parent.parent
INFER = ROOT / "vim" / "infer_rpi.py"
OPS = pathlib.Path(kernel_cache.__file__).resolve().parent
TOL = 1e-4
pytestmark = pytest.mark.slow  # about a dozen fresh processes that compile the kernels
needs_numba = pytest.mark.skipif(importlib.util.find_spec("numba") is None, reason="numba not installed")


# ---- the entry format, on synthetic entries ------------------------------------------------------

KEY = "0123456789abcdef01234567"
NAMES = ("conv", "scan")
META = {"symbols": {"conv": "cfunc.convB2v1", "scan": "cfunc.scanB3v11"}, "externals": ["sqrt"]}


def synthetic_object(seed=0, symbols=("cfunc.convB2v1", "cfunc.scanB3v11")):
    rng = random.Random(seed)
    return b"".join(rng.randbytes(500) + s.encode() for s in symbols) + rng.randbytes(500)


def entry(obj=None, meta=META, key=KEY):
    return kernel_cache.encode(key, synthetic_object() if obj is None else obj, meta)


def with_header(body):
    """An entry whose header matches `body` (metadata line + object): only the later checks can refuse it."""
    return f"mamba_ssm-kernels {kernel_cache.FORMAT} {len(body)} {hashlib.sha256(body).hexdigest()}\n".encode() + body


def test_entry_round_trips():
    obj = synthetic_object()
    got_obj, got_meta = kernel_cache.decode(entry(obj), KEY, NAMES)
    assert got_obj == obj and got_meta == dict(META, key=KEY)


def test_every_flipped_bit_and_every_truncation_is_refused():
    """Each byte of an entry with one bit flipped (the bit cycles with the offset), and the entry
    cut at every length, fails a check before any byte could reach llvmlite."""
    data = entry()
    for at in range(len(data)):
        damaged = data[:at] + bytes([data[at] ^ (1 << at % 8)]) + data[at + 1:]
        with pytest.raises(kernel_cache.DamagedEntry):
            kernel_cache.decode(damaged, KEY, NAMES)
        with pytest.raises(kernel_cache.DamagedEntry):
            kernel_cache.decode(data[:at], KEY, NAMES)
    with pytest.raises(kernel_cache.DamagedEntry, match="bytes after its header"):
        kernel_cache.decode(data + b"\0", KEY, NAMES)


body = json.dumps(dict(META, key=KEY)).encode() + b"\n" + synthetic_object()


@pytest.mark.parametrize("data,reason", [
    (b"", "empty"),
    (os.urandom(4000), "header"),
    (b"\n" * 100, "header"),
    (entry().replace(b"kernels 2 ", b"kernels 1 ", 1), "format 1"),
    (entry().replace(b"kernels 2 ", b"kernels 2 99", 1), "which says"),
    (with_header(b"null\n" + synthetic_object()), "not a JSON object"),  # `null`, with a matching digest
    (entry().replace(b"kernels 2 ", b"kernels 2 " + b"9" * 5000, 1), "header"),  # beyond int()'s digit limit
    (with_header(b"{not json\n" + synthetic_object()), "not JSON"),
    (with_header(b"[" * 100_000 + b"\n"), "not JSON"),  # deeper than the parser's recursion limit
    (entry(key="f" * 24), "another compile"),
    (entry(meta={"symbols": {"conv": "cfunc.convB2v1"}, "externals": []}), "does not list"),
    (entry(meta=dict(META, externals="sqrt")), "does not list"),
    # a mixed pair with a consistent header: the metadata of a compile that numbered the kernels
    # differently (one more @njit before it), the object of another
    (entry(meta={"symbols": {"conv": "cfunc.convB2v2", "scan": "cfunc.scanB3v12"}, "externals": []}),
     "does not define cfunc.convB2v2"),
])
def test_bad_entries_are_refused_saying_why(data, reason):
    with pytest.raises(kernel_cache.DamagedEntry, match=reason):
        kernel_cache.decode(data, KEY, NAMES)


def test_reading(tmp_path):
    """No file: None. A directory, a file that cannot be read, or one too large to be an entry
    (not read whole): damaged."""
    assert kernel_cache._read(tmp_path / "none.kernels", KEY, NAMES) is None
    assert kernel_cache._read(tmp_path / "none" / "x.kernels", KEY, NAMES) is None
    (tmp_path / "dir.kernels").mkdir()
    with pytest.raises(kernel_cache.DamagedEntry, match="cannot be read"):
        kernel_cache._read(tmp_path / "dir.kernels", KEY, NAMES)
    huge = tmp_path / "huge.kernels"
    with open(huge, "wb") as f:
        f.truncate(kernel_cache._MAX_BYTES + 1)  # sparse: no disk space
    with pytest.raises(kernel_cache.DamagedEntry, match="too large"):
        kernel_cache._read(huge, KEY, NAMES)
    (tmp_path / "good.kernels").write_bytes(entry())
    assert kernel_cache._read(tmp_path / "good.kernels", KEY, NAMES)[0] == synthetic_object()


def test_cache_dirs(monkeypatch, tmp_path):
    """NUMBA_CACHE_DIR alone; else the package's __pycache__, then the user's cache."""
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "numba"))
    assert kernel_cache.cache_dirs() == [tmp_path / "numba"]
    monkeypatch.setenv("NUMBA_CACHE_DIR", "")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert kernel_cache.cache_dirs() == [OPS / "__pycache__", tmp_path / "xdg" / "mamba_ssm"]
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert kernel_cache.cache_dirs() == [OPS / "__pycache__", tmp_path / "home" / ".cache" / "mamba_ssm"]


@pytest.mark.skipif(importlib.util.find_spec("llvmlite") is None, reason="llvmlite not installed")
def test_key_names_versions_cpu_and_sources(monkeypatch, tmp_path):
    """Another numba, llvmlite, CPU or kernel source: another key (the entry's name)."""
    source = tmp_path / "kernels.py"
    source.write_text("a")
    keys = {kernel_cache._cache_key("x86_64 znver4 +avx2", [source])}
    keys.add(kernel_cache._cache_key("aarch64 cortex-a76 +neon", [source]))
    source.write_text("b")
    keys.add(kernel_cache._cache_key("x86_64 znver4 +avx2", [source]))
    import llvmlite

    monkeypatch.setattr(llvmlite, "__version__", "0.0.1")
    keys.add(kernel_cache._cache_key("x86_64 znver4 +avx2", [source]))
    monkeypatch.setattr(kernel_cache.importlib.metadata, "version", lambda name: "0.0.1")
    keys.add(kernel_cache._cache_key("x86_64 znver4 +avx2", [source]))
    assert len(keys) == 5


# ---- the writer ------------------------------------------------------------------------------------

def test_write_flushes_the_data_before_the_rename_and_the_rename_after_and_any_user_reads_it(monkeypatch, tmp_path):
    events = []
    fsync, replace = os.fsync, os.replace

    def recording_fsync(fd):
        link = f"/proc/self/fd/{fd}"
        events.append(("fsync", "directory" if os.path.isdir(link) else os.readlink(link)))
        fsync(fd)

    def recording_replace(source, target):
        events.append(("replace", str(source), str(target)))
        replace(source, target)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    path = tmp_path / "x.kernels"
    umask = os.umask(0o077)  # root's under some sudo set-ups: the service's user must still read the entry
    try:
        kernel_cache.write(path, b"entry")
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644
    tmp = f"{path}.{os.getpid()}.tmp"
    assert events == [("fsync", tmp), ("replace", tmp, str(path)), ("fsync", "directory")]
    assert path.read_bytes() == b"entry" and os.listdir(tmp_path) == ["x.kernels"]


def _failing(real, error):
    """`real` raising `error`; as os.write, it first writes one 4 KB block (then the disk is full)."""
    calls = []

    def failing(*args):
        calls.append(args)
        if real is os.write and len(calls) == 1:
            return real(args[0], args[1][:4096])
        raise error

    return failing


@pytest.mark.parametrize("where,error", [
    ("write", OSError(errno.ENOSPC, "No space left on device")),  # a full disk
    ("fsync", OSError(errno.ENOSPC, "No space left on device")),  # delayed allocation reports it here
    ("fsync", OSError(errno.EIO, "Input/output error")),
    ("replace", OSError(errno.EACCES, "Permission denied")),
    ("write", KeyboardInterrupt()),
])
def test_a_failed_write_leaves_the_old_entry_and_no_temporary_file(monkeypatch, tmp_path, where, error):
    path = tmp_path / "x.kernels"
    path.write_bytes(b"old entry")
    monkeypatch.setattr(os, where, _failing(getattr(os, where), error))
    with pytest.raises(type(error)):
        kernel_cache.write(path, bytes(300_000))
    assert os.listdir(tmp_path) == ["x.kernels"] and path.read_bytes() == b"old entry"


# ---- real processes: damaged entries, read-only and full directories, concurrent starts ----------

def _env(**settings):
    """This environment for a fresh process: the default kernel choice, no cache variables but
    `settings` (None removes one), bytecode not written (a bind-mounted __pycache__ stays clean)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "NUMBA_CACHE_DIR", "SELECTIVE_SCAN_CPU_BACKEND", "CAUSAL_CONV1D_FORCE_FALLBACK",
                        "SELECTIVE_SCAN_FORCE_FALLBACK")}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.update({k: str(v) for k, v in settings.items() if v is not None})
    return env


def _run(command, env, mounts=(), timeout=300):
    """`command` in a fresh process; with `mounts`, in a private mount namespace where each
    ("bind", source, target) and ("ro", path) (a read-only bind of path onto itself) and
    ("tmpfs", path, size) is done first, in order. Returns the CompletedProcess."""
    if mounts:
        steps = []
        for kind, path, *rest in mounts:
            if kind == "bind":
                steps.append(f"mount --bind {shlex.quote(str(path))} {shlex.quote(str(rest[0]))}")
            elif kind == "ro":
                steps.append(f"mount --bind {shlex.quote(str(path))} {shlex.quote(str(path))}")
                steps.append(f"mount -o remount,bind,ro {shlex.quote(str(path))}")
            else:
                steps.append(f"mount -t tmpfs -o size={rest[0]} tmpfs {shlex.quote(str(path))}")
        steps.append("exec " + shlex.join(map(str, command)))
        command = ["unshare", "-m", "--propagation", "private", "sh", "-ec", "\n".join(steps)]
    return subprocess.run(list(map(str, command)), env=env, capture_output=True, text=True, timeout=timeout)


@functools.lru_cache(maxsize=None)
def _mounts_work():
    try:
        return _run(["true"], _env(), [("tmpfs", tempfile.gettempdir(), "1k")], timeout=30).returncode == 0
    except OSError:  # no unshare
        return False


needs_mounts = pytest.mark.skipif("not _mounts_work()", reason="needs root for a private mount namespace (unshare -m)")


def _entries(directory):
    return sorted(p.name for p in pathlib.Path(directory).iterdir()) if pathlib.Path(directory).exists() else []


def _key_of(path):
    return path.name[len("bimamba_v2_numba-"):-len(".kernels")]


def _decodes(path):
    return kernel_cache.decode(path.read_bytes(), _key_of(path), ("conv", "scan", "add_rms_norm"))


def _warnings(stderr):
    return [line for line in stderr.splitlines() if "Warning:" in line]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A small random-weight Vim checkpoint (its head scaled so that the top classes stand apart),
    a noise image, the pure-PyTorch path's top-5 for it, and a cache made by a first run (whose
    result is checked too)."""
    import vim_rpi
    from vim_rpi import checkpoint_io

    root = tmp_path_factory.mktemp("kernel_cache")
    torch.manual_seed(0)
    model = vim_rpi.create_model("vim_tiny", depth=2, embed_dim=64, num_classes=1000)
    with torch.no_grad():
        model.head.weight.mul_(20)
    checkpoint_io.save_checkpoint(root / "small.pth", model)
    noise = torch.randint(0, 256, (96, 128, 3), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    Image.fromarray(noise.numpy()).save(root / "noise.png")
    files = {"root": root, "ckpt": root / "small.pth", "image": root / "noise.png"}
    done, report = _classify(files, root / "unused", "--backend", "torch")
    assert done.returncode == 0, done.stderr
    files["want"] = report["results"][0]["topk"]
    return files


def _classify(files, cache_dir, *args, mounts=(), **settings):
    """infer_rpi.py on the noise image; returns (CompletedProcess, its JSON report or None)."""
    command = [sys.executable, INFER, files["image"], "-c", files["ckpt"], "-t", "1", "--json", "-q", *args]
    done = _run(command, _env(NUMBA_CACHE_DIR=cache_dir, VIM_RPI_CACHE=files["root"] / "downloads", **settings),
                mounts)
    return done, json.loads(done.stdout) if done.returncode == 0 else None


def _assert_torch_result(files, report):
    got, want = report["results"][0]["topk"], files["want"]
    assert [e["index"] for e in got] == [e["index"] for e in want]
    assert max(abs(g["prob"] - w["prob"]) for g, w in zip(got, want)) <= TOL


@pytest.fixture(scope="module")
def pristine(files):
    """The entry a first run writes into an empty cache directory, and one of another compile
    that numbered the kernels' symbols differently (numba had compiled one function before)."""
    first = files["root"] / "first"
    done, report = _classify(files, first)
    assert done.returncode == 0 and not _warnings(done.stderr), done.stderr
    assert report["backend"]["selective_scan"] == "numba"
    _assert_torch_result(files, report)
    [name] = _entries(first)
    other = files["root"] / "other"
    code = "import numba; numba.njit(lambda x: x + 1)(1); from mamba_ssm.ops import bimamba_v2_numba as f; f.warm_up()"
    done = _run([sys.executable, "-c", code], _env(NUMBA_CACHE_DIR=other))
    assert done.returncode == 0, done.stderr
    data, other_data = (first / name).read_bytes(), (other / name).read_bytes()
    assert kernel_cache.decode(data, _key_of(first / name), ())[1]["symbols"] != \
        kernel_cache.decode(other_data, _key_of(first / name), ())[1]["symbols"]
    return {"name": name, "data": data, "other": other_data}


def _flip(fraction):
    def damage(data, other):
        at = int(len(data) * fraction)
        return data[:at] + bytes(b ^ 0xFF for b in data[at:at + 8]) + data[at + 8:]
    return damage


def _float_constant(data, other):
    """exp2's polynomial coefficient ln 2 (as float32) changed in the code's constant pool: the
    object still loads and runs, and computes something else."""
    old, new = np.float32(1.386294405710084).tobytes(), np.float32(1.3).tobytes()
    assert old in data
    return data.replace(old, new)


def _split(data):
    """An entry's (header + metadata lines, object)."""
    first = data.index(b"\n")
    second = data.index(b"\n", first + 1)
    return data[:second + 1], data[second + 1:]


DAMAGES = {
    "truncated": lambda data, other: data[:len(data) // 2],
    "empty": lambda data, other: b"",
    "random": lambda data, other: random.Random(0).randbytes(len(data)),
    "flipped at 1/3": _flip(1 / 3),
    "flipped at 1/2": _flip(1 / 2),
    "flipped at 2/3": _flip(2 / 3),
    "float constant": _float_constant,
    "metadata corrupted": lambda data, other: data.replace(b'"symbols": {', b'"symbols": [', 1),
    "metadata null": lambda data, other: with_header(b"null\n" + _split(data)[1]),
    "mixed pair": lambda data, other: _split(other)[0] + _split(data)[1],
}


@needs_numba
@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_entry_is_compiled_again(files, pristine, tmp_path, damage):
    """The next run exits 0 with the pure-PyTorch path's top-5 (the fused kernels, compiled again),
    replaces the entry with a valid one, and says so once, naming the file."""
    path = tmp_path / pristine["name"]
    path.write_bytes(DAMAGES[damage](pristine["data"], pristine["other"]))
    done, report = _classify(files, tmp_path)
    assert done.returncode == 0, (done.returncode, done.stderr)
    _assert_torch_result(files, report)
    assert report["backend"]["selective_scan"] == "numba"
    [warning] = _warnings(done.stderr)
    assert f"{path} was damaged" in warning and "compiled again" in warning
    assert _entries(tmp_path) == [pristine["name"]]
    _decodes(path)


@needs_numba
@needs_mounts
def test_a_damaged_entry_in_a_read_only_directory_runs_the_torch_path(files, pristine, tmp_path):
    """Nothing writable: one warning naming the file and what to do, the pure-PyTorch path's
    result; the set-up check says the fused kernels will not run (exit 1), naming the file."""
    path = tmp_path / pristine["name"]
    path.write_bytes(DAMAGES["flipped at 1/2"](pristine["data"], None))
    done, report = _classify(files, tmp_path, mounts=[("ro", tmp_path)])
    assert done.returncode == 0, (done.returncode, done.stderr)
    _assert_torch_result(files, report)
    assert report["backend"]["selective_scan"] == "torch"
    [warning] = _warnings(done.stderr)
    assert f"{path} is damaged" in warning and "Read-only file system" in warning
    assert "delete it or re-run set-up" in warning and "NUMBA_CACHE_DIR" in warning
    check = _run([sys.executable, "-m", "mamba_ssm.kernel_check"], _env(NUMBA_CACHE_DIR=tmp_path), [("ro", tmp_path)])
    assert check.returncode == 1 and check.stderr == ""
    [line] = check.stdout.splitlines()
    assert line.startswith("the fused numba kernels will not run (") and f"{path} is damaged" in line
    assert line.endswith("the pure-PyTorch path will")


@needs_numba
@needs_mounts
def test_an_unwritable_cache_directory_is_one_warning(files, tmp_path):
    """The fused path, compiled in the process, and one warning with the directory, the cost
    and the variable that moves the cache."""
    done, report = _classify(files, tmp_path, mounts=[("ro", tmp_path)])
    assert done.returncode == 0, done.stderr
    _assert_torch_result(files, report)
    assert report["backend"]["selective_scan"] == "numba"
    [warning] = _warnings(done.stderr)
    assert f"{tmp_path}: Read-only file system" in warning and "several seconds" in warning
    assert "set NUMBA_CACHE_DIR to a writable directory" in warning


@needs_numba
@needs_mounts
def test_a_full_disk_leaves_no_temporary_file(tmp_path):
    """A real full file system (a 16 KB tmpfs; an entry is ~40 KB): the kernels run, compiled in
    the process, one warning says why they are not cached, and no temporary file is left."""
    disk = tmp_path / "disk"
    disk.mkdir()
    code = """
        import os, sys
        from mamba_ssm.ops import bimamba_v2_numba as fused
        print(fused.warm_up(), os.listdir(sys.argv[1]))
    """
    done = _run([sys.executable, "-c", textwrap.dedent(code), disk], _env(NUMBA_CACHE_DIR=disk),
                [("tmpfs", disk, "16k")])
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["None", "[]"]
    [warning] = _warnings(done.stderr)
    assert f"{disk}: No space left on device" in warning


@needs_numba
@needs_mounts
def test_a_read_only_package_directory_serves_the_cache_set_up_made(tmp_path):
    """Set-up (root) writes the entry next to the package; a later run on a read-only package
    directory (a service user's view) loads it without compiling or importing numba and writes
    nothing into the user's cache. Damaged there, it is compiled into the user's cache (and
    reported); with the user's cache read-only too, the pure-PyTorch path runs."""
    package_cache, home = tmp_path / "package", tmp_path / "home"
    package_cache.mkdir()
    home.mkdir()
    (OPS / "__pycache__").mkdir(exist_ok=True)  # the mount point
    env = _env(XDG_CACHE_HOME=home)
    rw = [("bind", package_cache, OPS / "__pycache__")]
    ro = [("ro", OPS), ("bind", package_cache, OPS / "__pycache__"), ("ro", OPS / "__pycache__")]
    check = _run([sys.executable, "-m", "mamba_ssm.kernel_check"], env, rw)
    assert check.returncode == 0, check.stderr
    [name] = _entries(package_cache)
    assert check.stdout.startswith("ok: the fused numba kernels match the pure-PyTorch path")
    assert check.stdout.strip().endswith(f"cached in {OPS / '__pycache__' / name}")

    code = "import sys; from mamba_ssm.ops import bimamba_v2_numba as f; print(f.warm_up(), 'numba' in sys.modules)"
    done = _run([sys.executable, "-c", code], env, ro)
    assert done.returncode == 0 and not _warnings(done.stderr), done.stderr
    assert done.stdout.split() == [str(OPS / "__pycache__" / name), "False"]
    assert _entries(home) == []

    (package_cache / name).write_bytes(b"\0" * 100)
    done = _run([sys.executable, "-c", code], env, ro)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(home / "mamba_ssm" / name), "True"]
    [warning] = _warnings(done.stderr)
    assert f"{OPS / '__pycache__' / name} is damaged" in warning and "Read-only file system" in warning
    _decodes(home / "mamba_ssm" / name)

    (home / "mamba_ssm" / name).unlink()
    check = _run([sys.executable, "-m", "mamba_ssm.kernel_check"], env, ro + [("ro", home)])
    assert check.returncode == 1 and f"{OPS / '__pycache__' / name} is damaged" in check.stdout


@needs_numba
def test_four_processes_starting_at_once_with_no_cache(tmp_path):
    """All exit 0 and report the same entry; one valid file is left, no temporary file."""
    code = "from mamba_ssm.ops import bimamba_v2_numba as f; print(f.warm_up())"
    processes = [subprocess.Popen([sys.executable, "-c", code], env=_env(NUMBA_CACHE_DIR=tmp_path),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outputs = [p.communicate(timeout=300) for p in processes]
    assert [p.returncode for p in processes] == [0] * 4, outputs
    assert all(err == "" for _, err in outputs), outputs
    [name] = _entries(tmp_path)
    assert {out.strip() for out, _ in outputs} == {str(tmp_path / name)}
    _decodes(tmp_path / name)


@needs_numba
def test_loaded_without_numba_after_the_first_run(pristine, tmp_path):
    """A valid entry (the first run's, in `pristine`) is loaded without importing numba."""
    (tmp_path / pristine["name"]).write_bytes(pristine["data"])
    code = "import sys; from mamba_ssm.ops import bimamba_v2_numba as f; print(f.warm_up(), 'numba' in sys.modules)"
    done = _run([sys.executable, "-c", code], _env(NUMBA_CACHE_DIR=tmp_path))
    assert (done.returncode, done.stdout.split(), done.stderr) == (0, [str(tmp_path / pristine["name"]), "False"], "")
    assert (tmp_path / pristine["name"]).read_bytes() == pristine["data"]


# ---- the set-up check --------------------------------------------------------------------------

@needs_numba
def test_check_refuses_kernels_that_compute_something_else(files, pristine, tmp_path):
    """An entry whose checks pass but whose code is wrong (a constant changed and the header
    made to match: a miscompile would look the same) is caught against the pure-PyTorch path."""
    header, obj = _split(pristine["data"])
    meta = json.loads(header.split(b"\n")[1])
    wrong = kernel_cache.encode(meta.pop("key"), _float_constant(obj, None), meta)
    (tmp_path / pristine["name"]).write_bytes(wrong)
    check = _run([sys.executable, "-m", "mamba_ssm.kernel_check"], _env(NUMBA_CACHE_DIR=tmp_path))
    assert check.returncode == 1, check.stderr
    [line] = check.stdout.splitlines()
    path = tmp_path / pristine["name"]
    assert line.startswith("the fused numba kernels will not be used: they differ from the pure-PyTorch path by ")
    assert f"marked {path} as wrong" in line
    # later processes refuse the marked entry: the pure-PyTorch path, one warning naming the marker
    done, report = _classify(files, tmp_path)
    assert done.returncode == 0, done.stderr
    _assert_torch_result(files, report)
    assert report["backend"]["selective_scan"] == "torch"
    [warning] = _warnings(done.stderr)
    assert f"found the kernels in {path} wrong" in warning and f"delete {path}.rejected" in warning
    again = _run([sys.executable, "-m", "mamba_ssm.kernel_check"], _env(NUMBA_CACHE_DIR=tmp_path))
    assert again.returncode == 1 and "will not run (RuntimeError: set-up's check found" in again.stdout


@needs_numba
def test_check_says_why_without_a_working_numba(tmp_path):
    (tmp_path / "stand-in" / "numba").mkdir(parents=True)
    (tmp_path / "stand-in" / "numba" / "__init__.py").write_text("raise ImportError('stand-in numba: broken')\n")
    check = _run([sys.executable, "-m", "mamba_ssm.kernel_check"],
                 _env(NUMBA_CACHE_DIR=tmp_path / "cache", PYTHONPATH=tmp_path / "stand-in"))
    assert (check.returncode, check.stdout, check.stderr) == (
        1, "the fused numba kernels will not run (ImportError: stand-in numba: broken); "
           "the pure-PyTorch path will\n", "")
    assert not (tmp_path / "cache").exists()
