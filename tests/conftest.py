"""Test-session set-up.

Without a GPU, Triton kernels run through Triton's interpreter. The interpreter mode is fixed when triton is
first imported, so it is set here, before any test module imports fasttune (which imports triton)."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


def pytest_report_header(config):
    from seeding import SESSION_SEED

    return f"random draws: FASTTUNE_TEST_SEED={SESSION_SEED} replays them"


@pytest.fixture(scope="module")
def one_thread():
    """Run a module single-threaded (use with `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
