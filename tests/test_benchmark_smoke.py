"""scripts/benchmark.py runs end to end at toy sizes and prints one well-formed JSON object.

Timings are not checked (they depend on the machine); the structure, the variant set and the
relations that hold on any machine are. The fresh-process measurements (peak RSS, page faults)
start four more Python processes, too slow for this suite, so they are skipped here.
"""

import importlib.util
import json
import math
import pathlib
import subprocess
import sys

import pytest
import torch
from causal_conv1d import backends

HAS_NUMBA = importlib.util.find_spec("numba") is not None
SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "scripts" / "benchmark.py"
pytestmark = pytest.mark.slow  # every test reads one run of the benchmark script


def _run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def report():
    done = _run("--quick", "--tiny", "--no-processes", "--json", "--threads", "1", "2")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # stdout is exactly one JSON object


def test_variants_and_statistics(report):
    rows = report["results"]
    numba = ("vim numba",) if HAS_NUMBA else ()
    batch1 = {(r["name"], r["threads"]) for r in rows if r["batch"] == 1}
    assert batch1 == {(name, t) for name in ("vim fp32", "vim int8", "vim ref", "deit fp32") + numba for t in (1, 2)}
    assert {(r["name"], r["batch"]) for r in rows if r["batch"] != 1} == {
        (name, 8) for name in ("vim fp32", "deit fp32") + numba}
    backends = {"vim ref": "ref", "vim numba": "numba"}
    for r in rows:
        assert r["runs"] == 1
        assert 0 < r["min_ms"] <= r["median_ms"] <= r["p90_ms"]
        assert math.isclose(r["images_per_s"], r["batch"] * 1e3 / r["median_ms"])
        assert r["backend"] == backends.get(r["name"], "torch")
        if r["name"] == "deit fp32":
            assert r["x_deit"] == 1.0


def test_headline_ratios_match_the_rows(report):
    rows = {(r["name"], r["threads"]): r["median_ms"] for r in report["results"] if r["batch"] == 1}
    for threads in (1, 2):
        key = str(threads)
        assert math.isclose(report["headline"]["vim_over_deit"][key],
                            rows[("vim fp32", threads)] / rows[("deit fp32", threads)])
        assert math.isclose(report["headline"]["ref_over_fast"][key],
                            rows[("vim ref", threads)] / rows[("vim fp32", threads)])


def test_dispatched_ops_and_environment(report):
    ops = report["dispatched_ops"]
    assert "TorchDispatchMode" in ops["method"]
    for name in ("vim fp32", "vim int8", "vim ref", "deit fp32") + (("vim numba",) if HAS_NUMBA else ()):
        assert ops[name]["total"] >= sum(ops[name]["top"].values()) > 0
    # the sequential reference runs per time step, the fast path per chunk of steps
    assert ops["vim ref"]["total"] > ops["vim fp32"]["total"]
    env = report["environment"]
    assert env["torch"] and env["cpu"] and env["cores"] >= 1
    assert env["backend"]["selective_scan"] == ("numba" if HAS_NUMBA else "torch")
    assert (env["numba"] is not None) == HAS_NUMBA
    assert report["config"] == {**report["config"], "tiny": True, "threads": [1, 2], "repeats": 1}
    assert "peak_rss_mb" not in report


@pytest.fixture(scope="module")
def benchmark():
    """The script as a module, to call its main() in this process (no second torch import)."""
    spec = importlib.util.spec_from_file_location("benchmark_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_table_goes_to_stdout(benchmark, capsys):
    threads = torch.get_num_threads()
    try:
        assert benchmark.main(["--quick", "--tiny", "--no-processes", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    out, err = capsys.readouterr()
    assert "Vim/DeiT" in out and "vim ref" in out and not out.lstrip().startswith("{")
    assert backends.current_backend() == "auto"  # the per-variant backend choice is undone
    assert "round 1/1" in err and "round" not in out


@pytest.mark.parametrize("bad,message", [(["--repeats", "0"], "--repeats must be >= 1"),
                                         (["--threads", "0"], "--threads must be >= 1"),
                                         (["--model", "vim_tinny"], "vim_tiny")])
def test_usage_errors(benchmark, capsys, bad, message):
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(bad)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
