import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one thread is fastest, and far faster than two on a busy 2-core machine.
    The previous count is restored for the tests after the module's."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def processes():
    """Started subprocesses, killed at teardown if a test left one running."""
    started = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture
def main_in_process(monkeypatch, capsys, tmp_path):
    """vim/infer_rpi.py's main() run inside pytest (cheaper than a process), with an empty
    download cache: returns run(args) -> (exit code, stdout, stderr); restores the thread count."""
    monkeypatch.setenv("VIM_RPI_CACHE", str(tmp_path / "cache"))
    from vim_rpi import infer_rpi

    threads = torch.get_num_threads()

    def run(args):
        try:
            code = infer_rpi.main([str(a) for a in args])
        except SystemExit as exit_info:
            code = exit_info.code
        out, err = capsys.readouterr()
        return code, out, err

    yield run
    torch.set_num_threads(threads)
