"""The package's layers, read from the source with an AST walk: every module imports only from
layers below its own (imports inside functions count too), so there is no cycle; the kernel
packages never import upward; nothing edits the import path outside the emulated-Pi plumbing."""

import ast
import re
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = REPO / "vim"

# Lowest first; a module may import modules of strictly lower layers.
LAYERS = [
    {"errors", "registry", "imagenet_labels", "progress", "image_budget", "paths", "temp_files"},
    {"vision_mamba", "hub", "image_preprocess", "quantization", "runtime"},
    {"checkpoint_io"},
    {"factory"},
    {"classifier", "folder_dataset", "engine"},
    {"streams"},
    {"cli", "batcher", "access", "connections", "uploads"},
    {"infer_rpi", "main", "models_mamba", "server"},
    {"serve_rpi"},
]
# The web framework is optional (scripts/requirements-serve.txt): only the server may import it.
WEB_PACKAGES = ("fastapi", "starlette", "uvicorn", "h11", "python_multipart", "multipart", "pydantic")
WEB_MODULES = {"server", "serve_rpi", "access", "connections", "uploads"}
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _imports(path, package):
    """Names of `package`'s modules that the file at `path` imports (anywhere in the file)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module:
            parts = node.module.split(".")
            if parts[0] == package:
                found.update([parts[1]] if len(parts) > 1 else [a.name for a in node.names])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == package and len(parts) > 1:
                    found.add(parts[1])
    return found


def _modules():
    return sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")


def test_every_module_has_a_layer():
    assert set(_modules()) == set(RANK), "add new modules to LAYERS"


@pytest.mark.parametrize("module", _modules())
def test_imports_go_only_downward(module):
    upward = {name for name in _imports(PACKAGE / f"{module}.py", "vim_rpi") if RANK[name] >= RANK[module]}
    assert not upward, f"vim_rpi.{module} (layer {RANK[module]}) imports {sorted(upward)} from its layer or above"


@pytest.mark.parametrize("module", sorted(set(_modules()) - WEB_MODULES))
def test_only_the_server_imports_the_web_framework(module):
    used = [name for name in WEB_PACKAGES if _imports_package(PACKAGE / f"{module}.py", name)]
    assert not used, f"vim_rpi.{module} imports {used}; only {sorted(WEB_MODULES)} may"


def test_the_package_init_imports_nothing_eagerly():
    """`import vim_rpi` stays cheap: its names load on first use."""
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    top_level = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert [a.name for n in top_level for a in n.names] == ["importlib"]


@pytest.mark.parametrize("package_dir,package,forbidden", [
    ("causal-conv1d/causal_conv1d", "causal_conv1d", ("mamba_ssm", "vim_rpi")),
    ("mamba-1p1p1/mamba_ssm", "mamba_ssm", ("vim_rpi",)),
    ("vim", "vim_rpi", ("scripts", "tests")),
])
def test_kernel_packages_and_package_never_import_upward(package_dir, package, forbidden):
    for path in (REPO / package_dir).rglob("*.py"):
        for name in forbidden:
            assert not _imports_package(path, name), f"{path.relative_to(REPO)} imports {name}"


def _imports_package(path, name):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == name:
            return True
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == name for a in node.names):
            return True
    return False


def test_no_import_path_edits():
    """Everything imports the installed packages (pip install -e); only the emulated Pi's start-up
    hook may touch the interpreter's paths."""
    needle = ".".join(("sys", "path"))  # spelled so that grep finds no use in this file either
    allowed = {REPO / "scripts" / "arm64" / "guest-site" / "sitecustomize.py"}
    offenders = [str(p.relative_to(REPO)) for folder in ("vim", "scripts", "tests")
                 for p in (REPO / folder).rglob("*") if p.suffix in (".py", ".sh") and p not in allowed
                 and needle in p.read_text()]
    assert not offenders


# ---- the kernel packages --------------------------------------------------------------------------

KERNEL_SOURCES = {"causal_conv1d": REPO / "causal-conv1d" / "causal_conv1d", "mamba_ssm": REPO / "mamba-1p1p1" / "mamba_ssm"}
# The one module per package that reads environment variables.
ENV_MODULES = {"causal_conv1d": "backends.py", "mamba_ssm": "env.py"}
# Machinery beside the ops: the on-disk cache of compiled kernels is handed the function that
# compiles a kernel set (called once per machine, never per op call).
NOT_OPS = {"kernel_cache.py"}


def test_the_lower_kernel_package_never_names_the_upper_one():
    """causal_conv1d knows nothing of mamba_ssm: not its name, not its selective-scan family (its
    kernel sets, variables or numba kernels), not even in a comment."""
    for path in KERNEL_SOURCES["causal_conv1d"].rglob("*.py"):
        text = path.read_text().lower()
        for name in ("mamba_ssm", "selective_scan"):
            assert name not in text, f"{path.relative_to(REPO)} names {name}"


def _functions(tree):
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))]


@pytest.mark.parametrize("folder", [KERNEL_SOURCES["causal_conv1d"], KERNEL_SOURCES["mamba_ssm"] / "ops"])
def test_ops_never_call_back(folder):
    """Ops take tensors (and names): no function of the kernel layers calls one of its own
    parameters, so a module cannot hand an op a callback (a closure over its layers, a builder of
    its constants)."""
    offenders = []
    for path in folder.rglob("*.py"):
        if path.name in NOT_OPS:
            continue
        for function in _functions(ast.parse(path.read_text(), str(path))):
            args = function.args
            params = {a.arg for a in args.posonlyargs + args.args + args.kwonlyargs}
            params |= {a.arg for a in (args.vararg, args.kwarg) if a is not None}
            params -= {"self", "cls", "ctx"}  # methods of objects, autograd's context
            called = {n.func.id for n in ast.walk(function) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
            if called & params:
                name = getattr(function, "name", "<lambda>")
                offenders.append(f"{path.relative_to(REPO)}:{function.lineno} {name} calls {sorted(called & params)}")
    assert not offenders


@pytest.mark.parametrize("package", sorted(KERNEL_SOURCES))
def test_environment_is_read_in_one_module_per_package(package):
    readers = set()
    for path in KERNEL_SOURCES[package].rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        enclosing = {}  # node -> name of the innermost function around it
        for function in sorted(_functions(tree), key=lambda f: (f.lineno, f.col_offset)):
            for node in ast.walk(function):
                enclosing[node] = getattr(function, "name", "<lambda>")
        for node in ast.walk(tree):
            reads = (isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv")) or (
                isinstance(node, ast.Name) and node.id in ("environ", "getenv"))
            where = enclosing.get(node, "<module>")
            if reads and path.name != ENV_MODULES[package]:
                readers.add(f"{path.relative_to(REPO)}:{where}")
    assert not readers, f"only {package}/{ENV_MODULES[package]} reads the environment"


def test_the_lower_package_reads_only_its_own_variables():
    """Every environment variable causal_conv1d names is one of its own (CAUSAL_CONV1D_*)."""
    pattern = re.compile(r"[A-Z][A-Z0-9]*(_[A-Z0-9]+)+")
    for path in KERNEL_SOURCES["causal_conv1d"].rglob("*.py"):
        names = {n.value for n in ast.walk(ast.parse(path.read_text(), str(path)))
                 if isinstance(n, ast.Constant) and isinstance(n.value, str) and pattern.fullmatch(n.value)}
        assert all(name.startswith("CAUSAL_CONV1D_") for name in names), (path.relative_to(REPO), names)
