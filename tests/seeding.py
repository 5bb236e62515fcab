"""Fresh random draws every test session: one seed per session (shown in pytest's header and in kernel-test failure
messages); FASTTUNE_TEST_SEED=<n> replays a session's draws."""
import os
import random
import zlib

import torch

SESSION_SEED = int(os.environ.get("FASTTUNE_TEST_SEED") or random.SystemRandom().randrange(1, 2**31))
assert SESSION_SEED > 0, f"FASTTUNE_TEST_SEED must be a positive integer, got {SESSION_SEED}"


def _mix(salt) -> int:
    """This session's seed for one test case: the session seed mixed with a stable digest of `salt`."""
    return (SESSION_SEED * 1_000_003 + zlib.crc32(repr(salt).encode())) % 2**62


def generator(*salt) -> torch.Generator:
    return torch.Generator().manual_seed(_mix(salt))


def seed_all(*salt) -> int:
    """Seed torch's global generator (for code that draws from it) for one test case; returns the seed used."""
    seed = _mix(salt)
    torch.manual_seed(seed)
    return seed
