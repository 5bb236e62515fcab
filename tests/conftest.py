"""Test-session set-up.

Without a GPU, Triton kernels run through Triton's interpreter. The interpreter mode is fixed when triton is
first imported, so it is set here, before any test module imports fasttune (which imports triton)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


def pytest_report_header(config):
    from seeding import SESSION_SEED

    return f"random draws: FASTTUNE_TEST_SEED={SESSION_SEED} replays them"
