import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "vim"))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one thread is fastest, and far faster than two on a busy 2-core machine.
    The previous count is restored for the tests after the module's."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
