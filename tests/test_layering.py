"""The package's layers, read from the source with an AST walk: every module imports only from
layers below its own (imports inside functions count too), so there is no cycle; the kernel
packages never import upward; nothing edits the import path outside the emulated-Pi plumbing."""

import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = REPO / "vim"

# Lowest first; a module may import modules of strictly lower layers.
LAYERS = [
    {"errors", "registry", "imagenet_labels", "progress", "image_budget"},
    {"vision_mamba", "hub", "image_preprocess", "quantization", "runtime"},
    {"checkpoint_io"},
    {"factory"},
    {"classifier", "folder_dataset", "engine"},
    {"streams"},
    {"cli", "batcher"},
    {"infer_rpi", "main", "models_mamba", "server"},
    {"serve_rpi"},
]
# The web framework is optional (scripts/requirements-serve.txt): only the server may import it.
WEB_PACKAGES = ("fastapi", "starlette", "uvicorn", "python_multipart", "multipart", "pydantic")
WEB_MODULES = {"server", "serve_rpi"}
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
